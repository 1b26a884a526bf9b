"""Text in, text out: load a checkpoint, encode prompts, sample and decode."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from smdm.checkpoint import load_model
from smdm.data.tokenizer import Tokenizer
from smdm.generate import SampleConfig, generate
from smdm.model import Transformer
from smdm.runtime import resolve_device


def encode_prompt(tokenizer: Tokenizer, prompt: str, kind: str) -> list[int]:
    """Encode a prompt; an ARM's empty prompt becomes the EOS token, the start of every document."""
    ids = tokenizer.encode(prompt) if prompt else []
    if kind == "arm":
        ids = [tokenizer.eos_id] + ids
    return ids


def sample_from_model(
    model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], config: SampleConfig, num_samples: int = 1
) -> list[tuple[str, str]]:
    """Sample num_samples continuations of each prompt; return (prompt, continuation) pairs.

    Prompts run one at a time (each as a batch of its samples), so rows of
    different prompt lengths never share a canvas.
    """
    device = next(model.parameters()).device
    results = []
    for index, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, prompt, model.config.kind)
        batch = torch.tensor([ids] * num_samples, dtype=torch.long, device=device).reshape(num_samples, len(ids))
        row_config = SampleConfig(**{**config.__dict__, "seed": config.seed + index})
        for row in generate(model, batch, row_config, eos_id=tokenizer.eos_id):
            results.append((prompt, tokenizer.decode(row)))
    return results


def sample_text(
    checkpoint: str | Path,
    prompts: Sequence[str],
    *,
    num_samples: int = 1,
    device: str = "auto",
    **settings,
) -> list[tuple[str, str]]:
    """Load a checkpoint and sample; settings are SampleConfig fields (max_new_tokens, steps, ...)."""
    model, tokenizer, _ = load_model(checkpoint, resolve_device(device))
    return sample_from_model(model, tokenizer, prompts, SampleConfig(**settings), num_samples)
