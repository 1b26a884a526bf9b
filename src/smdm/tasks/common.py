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


class _GuidedMDM(torch.nn.Module):
    """An MDM whose logits are classifier-free guided: l = l_u + (w + 1)(l_c - l_u).

    l_c comes from the canvas as given and l_u from the same canvas with the
    first prompt_len positions replaced by the mask id (unsupervised CFG, Nie
    et al., arXiv 2410.18514). Both passes run as one batch of 2B rows.
    """

    # TODO: switch to smdm.guidance.cfg_logits and the sampler's own guidance once they exist.

    def __init__(self, model: Transformer, prompt_len: int, scale: float) -> None:
        super().__init__()
        if model.config.mask_id is None:
            raise ValueError("classifier-free guidance needs an MDM; use a guidance scale of 0 for an ARM")
        self.model = model
        self.config = model.config
        self.prompt_len = prompt_len
        self.scale = scale

    def forward(self, canvas: torch.Tensor, **kwargs) -> torch.Tensor:
        unconditional = canvas.clone()
        unconditional[:, : self.prompt_len] = self.config.mask_id
        logits = self.model(torch.cat([canvas, unconditional]), **kwargs)  # (2B, L, V)
        conditional, unconditional_logits = logits.float().chunk(2)
        return unconditional_logits + (self.scale + 1.0) * (conditional - unconditional_logits)


def generate_texts(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    config: SampleConfig,
    *,
    guidance: float = 0.0,
    max_new_tokens: Sequence[int] | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Generate one continuation per prompt; return the decoded texts in prompt order.

    Prompts are grouped by encoded length (and by max_new_tokens when given per
    prompt), because one batch of generate() shares a prompt length.
    """
    if guidance and not model.config.is_mdm:
        raise ValueError(f"guidance scale {guidance} needs an MDM; use 0 for an ARM")
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, prompt, model.config.kind) for prompt in prompts]
    lengths = list(max_new_tokens) if max_new_tokens is not None else [config.max_new_tokens] * len(prompts)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, (ids, new_tokens) in enumerate(zip(encoded, lengths)):
        groups[(len(ids), new_tokens)].append(index)
    texts: list[str] = [""] * len(prompts)
    for (prompt_len, new_tokens), members in sorted(groups.items()):
        group_config = replace(config, max_new_tokens=new_tokens)
        sampler = _GuidedMDM(model, prompt_len, guidance) if guidance else model
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            batch = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)
            for index, row in zip(chunk, generate(sampler, batch, group_config, eos_id=tokenizer.eos_id)):
                texts[index] = tokenizer.decode(row)
    return texts


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


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_number}: invalid JSON ({error})") from error
    return records
