"""Shared fixtures: the shared data folder and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from smdm.config import ModelConfig
from smdm.model import Transformer

SHARED_DATA = Path(os.environ.get("SMDM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_path(relative: str) -> Path:
    """Return a path under the shared data folder, or skip (fail in CI) when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        reason = f"shared data file {path} is missing; set SMDM_SHARED_DATA to the folder that contains MANIFEST.md"
        if os.environ.get("SMDM_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture
def shared_data():
    return shared_path


def tiny_model(kind: str = "mdm", vocab_size: int = 97, block_size: int = 64, seed: int = 0, **overrides) -> Transformer:
    """A 2-layer, width-32 model for fast CPU tests."""
    values = dict(kind=kind, n_layer=2, n_head=2, n_embd=32, intermediate_size=64, vocab_size=vocab_size,
                  block_size=block_size)
    values.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**values)).eval()
