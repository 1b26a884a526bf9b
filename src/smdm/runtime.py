"""Device, precision and seeding helpers shared by training, evaluation and sampling."""

from __future__ import annotations

import contextlib
import hashlib

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:N" into a torch.device, checking that it exists."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """Pick "bf16-mixed" on a CUDA device that supports bfloat16 when precision is "auto", else "fp32"."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for "bf16-mixed", a no-op context otherwise."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def derived_seed(*parts: int | str) -> int:
    """Mix integers and strings into one 63-bit seed, stable across runs, platforms and Python versions."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded from `parts`, so random draws are keyed by (seed, step, ...), not by history."""
    return torch.Generator().manual_seed(derived_seed(*parts))


def parse_dtype(name: str) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if name not in names:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(names)}")
    return names[name]
