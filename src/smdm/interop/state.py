"""Checks shared by every weight layout: expected names and shapes, and the tokenizer's vocabulary."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from smdm.config import ModelConfig
from smdm.data.tokenizer import Tokenizer
from smdm.model import Transformer

# Error messages list at most this many keys of each kind, so a wrong file gives a readable error.
_MAX_LISTED = 8


def expected_shapes(
    config: ModelConfig, to_layout: Callable[[Transformer], Mapping[str, torch.Tensor]]
) -> dict[str, tuple[int, ...]]:
    """Return the tensor shapes of `config` in a layout, built on the meta device so no memory is used."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(tensor.shape) for name, tensor in to_layout(model).items()}


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def check_tensors(
    tensors: Mapping[str, torch.Tensor | tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """Raise one ValueError that names every missing key, unknown key and shape mismatch."""
    shapes = {name: tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)
              for name, value in tensors.items()}
    missing = sorted(set(expected) - set(shapes))
    unknown = sorted(set(shapes) - set(expected))
    mismatched = [
        f"{name} has shape {list(shapes[name])}, expected {list(expected[name])}"
        for name in sorted(set(expected) & set(shapes))
        if shapes[name] != expected[name]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unknown:
        problems.append(f"unknown keys: {_listed(unknown)}")
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:_MAX_LISTED]))
    if problems:
        raise ValueError(f"{source} does not match the model it describes: " + ". ".join(problems))


def check_vocabulary(config: ModelConfig, tokenizer: Tokenizer, source: str) -> None:
    """Raise a ValueError when the tokenizer's ids do not fit the model's vocabulary."""
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"vocabulary mismatch: {source} has vocab_size={config.vocab_size} (output rows) but the tokenizer "
            f"{tokenizer.source or '(in memory)'} has {tokenizer.vocab_size} ids; pass the tokenizer the "
            "checkpoint was trained with"
        )
