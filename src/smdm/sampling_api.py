"""Text in, text out: load a checkpoint, encode prompts, sample and decode."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from smdm.checkpoint import load_model
from smdm.data.tokenizer import Tokenizer
from smdm.generate import SampleConfig, generate
from smdm.model import Transformer
from smdm.runtime import resolve_device


def encode_prompt(tokenizer: Tokenizer, prompt: str, kind: str) -> list[int]:
    """Encode a prompt; an ARM's prompt starts with the EOS token, the start of every document."""
    ids = tokenizer.encode(prompt) if prompt else []
    if kind == "arm":
        ids = [tokenizer.eos_id] + ids
    return ids


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """Cut text before the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stop_strings:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


def sample_from_model(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    config: SampleConfig,
    num_samples: int = 1,
    suffix: str | None = None,
) -> list[tuple[str, str]]:
    """Sample num_samples continuations of each prompt in one batch; return (prompt, continuation) pairs.

    Prompts of different lengths share the batch (padded, with attention masks).
    Row r = prompt index * num_samples + sample index draws its noise from the key
    (config.seed, r), so a given prompt and sample index gets the same text in any
    batch. With `suffix` (MDM only) the continuation fills the gap between each
    prompt and the suffix.
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples={num_samples} must be positive")
    ids = [encode_prompt(tokenizer, prompt, model.config.kind) for prompt in prompts]
    batch = [row for row in ids for _ in range(num_samples)]
    suffixes = [tokenizer.encode(suffix)] * len(batch) if suffix else None
    rows = generate(model, batch, config, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, suffixes=suffixes,
                    row_seeds=range(len(batch)), decode=tokenizer.decode)
    results = []
    for index, row in enumerate(rows):
        text = cut_at_stop_strings(tokenizer.decode(row), config.stop_strings)
        results.append((prompts[index // num_samples], text))
    return results


def sample_text(
    checkpoint: str | Path,
    prompts: Sequence[str],
    *,
    num_samples: int = 1,
    suffix: str | None = None,
    device: str = "auto",
    **settings,
) -> list[tuple[str, str]]:
    """Load a checkpoint and sample; settings are SampleConfig fields (max_new_tokens, steps, sampler, ...)."""
    model, tokenizer, _ = load_model(checkpoint, resolve_device(device))
    return sample_from_model(model, tokenizer, prompts, SampleConfig(**settings), num_samples, suffix)
