"""Helpers shared by the tasks: batched generation by prompt length, guidance and result files."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from smdm.data.tokenizer import Tokenizer
from smdm.generate import SampleConfig, generate
from smdm.model import Transformer
from smdm.sampling_api import encode_prompt


def generate_texts(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    config: SampleConfig,
    *,
    guidance: float = 0.0,
    max_new_tokens: Sequence[int] | None = None,
    batch_size: int = 16,
    truncate_prompts: bool = False,
    eos_only_last: bool = False,
) -> list[str]:
    """Generate one continuation per prompt; return the decoded texts in prompt order.

    Prompts of different lengths share batches (generate() pads them); prompts
    are grouped only by max_new_tokens when it is given per prompt. A guidance
    scale above 0 turns on the sampler's unsupervised classifier-free guidance.
    With truncate_prompts, a prompt that leaves too little room for its new
    tokens keeps only its last tokens (see keep_prompt_end); otherwise it raises.
    With eos_only_last, EOS may only be chosen as the last of a prompt's new
    tokens, so every answer fills its canvas.
    """
    if guidance and not model.config.is_mdm:
        raise ValueError(f"guidance scale {guidance} needs an MDM; use 0 for an ARM")
    encoded = [encode_prompt(tokenizer, prompt, model.config.kind) for prompt in prompts]
    lengths = list(max_new_tokens) if max_new_tokens is not None else [config.max_new_tokens] * len(prompts)
    if truncate_prompts:
        encoded = [keep_prompt_end(ids, model.config.block_size - new_tokens, model.config.kind)
                   for ids, new_tokens in zip(encoded, lengths)]
    groups: dict[int, list[int]] = defaultdict(list)
    for index, new_tokens in enumerate(lengths):
        groups[new_tokens].append(index)
    texts: list[str] = [""] * len(prompts)
    for new_tokens, members in sorted(groups.items()):
        group_config = replace(config, max_new_tokens=new_tokens, cfg=guidance)
        if eos_only_last:
            group_config = replace(group_config, min_new_tokens=new_tokens - 1)
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            # A seed per prompt, so a prompt's output does not depend on the batch it lands in.
            rows = generate(model, [encoded[i] for i in chunk], group_config, eos_id=tokenizer.eos_id,
                            pad_id=tokenizer.pad_id, row_seeds=[config.seed + i for i in chunk])
            for index, row in zip(chunk, rows):
                texts[index] = tokenizer.decode(row)
    return texts


def prompt_fits(model: Transformer, tokenizer: Tokenizer, prompt: str, new_tokens: int) -> bool:
    """Return whether the encoded prompt and new_tokens generated tokens fit the model's context."""
    return len(encode_prompt(tokenizer, prompt, model.config.kind)) + new_tokens <= model.config.block_size


def keep_prompt_end(ids: list[int], room: int, kind: str) -> list[int]:
    """Return the last `room` tokens of an encoded prompt, or the prompt itself when it fits.

    An ARM prompt keeps its leading EOS (the start of every training document)
    in front of the kept tokens. Dropping the start of a long question keeps the
    instruction that usually ends it, as FastChat does for models of short context.
    """
    if room < 2:
        raise ValueError(
            f"only {room} prompt tokens fit beside the new tokens in the model's context; lower --max-new-tokens"
        )
    if len(ids) <= room:
        return ids
    if kind == "arm":
        return ids[:1] + ids[len(ids) - room + 1 :]
    return ids[len(ids) - room :]


def sample_settings(config: SampleConfig, **extra) -> dict:
    """Return the sampler settings as a JSON-ready dict, with extra keys such as the guidance scale."""
    return {**config.__dict__, **extra}


def write_results(out: str | Path, name: str, results: dict, markdown: str) -> tuple[Path, Path]:
    """Write NAME.json and NAME.md into the folder `out`; return both paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / f"{name}.json"
    md_path = folder / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return json_path, md_path
