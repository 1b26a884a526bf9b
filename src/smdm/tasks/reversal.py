"""The reversal curse (Berglund et al., arXiv 2309.12288): facts trained in one direction, asked in both.

The data are fictitious name/description facts. "p2d" facts were trained as
name then description, "d2p" facts as description then name. Each test file
asks either in the trained direction or in the reversed one. A generation is
an exact match when the reference completion appears in it; BLEU comes from
sacrebleu.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import sacrebleu
import torch

from smdm.data.corpus import read_jsonl
from smdm.data.tokenizer import Tokenizer
from smdm.generate import SampleConfig
from smdm.model import Transformer
from smdm.sampling_api import encode_prompt
from smdm.tasks.common import generate_texts, prompt_fits, sample_settings

log = logging.getLogger(__name__)

TRAIN_FILE = "all_prompts_train.jsonl"
# split name -> (test file, question direction, whether it is the direction the fact was trained in)
TEST_SPLITS = {
    "p2d_same": ("p2d_prompts_test.jsonl", "name to description", True),
    "p2d_reversed": ("p2d_reverse_prompts_test.jsonl", "description to name", False),
    "d2p_same": ("d2p_prompts_test.jsonl", "description to name", True),
    "d2p_reversed": ("d2p_reverse_prompts_test.jsonl", "name to description", False),
}


def reversal_metrics(outputs: Sequence[str], references: Sequence[str]) -> dict:
    """Return exact match (share of outputs that contain their stripped reference) and corpus BLEU (0-100)."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} references")
    if not outputs:
        raise ValueError("no outputs to score")
    matches = [reference.strip() in output for output, reference in zip(outputs, references)]
    bleu = sacrebleu.corpus_bleu([output.strip() for output in outputs], [[ref.strip() for ref in references]])
    return {"exact_match": sum(matches) / len(matches), "bleu": bleu.score, "n": len(outputs)}


def evaluate_reversal(
    model: Transformer,
    tokenizer: Tokenizer,
    data_dir: str | Path,
    config: SampleConfig,
    *,
    splits: Sequence[str] = tuple(TEST_SPLITS),
    limit: int = 0,
    length_from_reference: bool = True,
    guidance: float = 0.0,
    batch_size: int = 32,
    eos_only_last: bool = False,
    rank: bool = False,
    rank_mc_samples: int = 32,
) -> dict:
    """Generate completions for each test split and score them.

    With length_from_reference each question gets a canvas of its reference's
    token count plus one (for EOS) new tokens, because the MDM fills a fixed
    canvas. The ARM stops at EOS either way. A question whose prompt and new
    tokens exceed the model's context is skipped and counted as `skipped` in
    its split. With eos_only_last EOS may only end the canvas, so a model
    cannot answer with an empty string. With rank, each split also gets
    the ranking of candidate_ranking.
    """
    data_dir = Path(data_dir)
    settings = sample_settings(config, guidance=guidance, length_from_reference=length_from_reference,
                               eos_only_last=eos_only_last)
    results: dict = {"settings": settings, "splits": {}}
    for split in splits:
        if split not in TEST_SPLITS:
            raise ValueError(f"unknown reversal split {split!r}; choose from {sorted(TEST_SPLITS)}")
        file, direction, trained = TEST_SPLITS[split]
        records = read_jsonl(data_dir / file)
        candidates = sorted({record["completion"] for record in records})
        if limit:
            records = records[:limit]
        if length_from_reference:
            new_counts = [len(tokenizer.encode(record["completion"])) + 1 for record in records]
        else:
            new_counts = [config.max_new_tokens] * len(records)
        fits = [prompt_fits(model, tokenizer, record["prompt"], new) for record, new in zip(records, new_counts)]
        skipped = fits.count(False)
        if skipped:
            log.warning("%s: skipping %d of %d questions whose prompt and new tokens exceed the context of %d tokens",
                        split, skipped, len(records), model.config.block_size)
        records = [record for record, ok in zip(records, fits) if ok]
        prompts = [record["prompt"] for record in records]
        references = [record["completion"] for record in records]
        lengths = [new for new, ok in zip(new_counts, fits) if ok] if length_from_reference else None
        outputs = generate_texts(model, tokenizer, prompts, config, guidance=guidance, max_new_tokens=lengths,
                                 batch_size=batch_size, eos_only_last=eos_only_last)
        metrics = reversal_metrics(outputs, references)
        metrics.update(direction=direction, trained_direction=trained, file=file, skipped=skipped)
        if rank:
            metrics["ranking"] = candidate_ranking(model, tokenizer, prompts, references, candidates,
                                                   mc_samples=rank_mc_samples, seed=config.seed)
        results["splits"][split] = metrics
        results.setdefault("examples", {})[split] = [
            {"prompt": p, "reference": r, "output": o} for p, r, o in list(zip(prompts, references, outputs))[:5]
        ]
    return results


def candidate_ranking(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    references: Sequence[str],
    candidates: Sequence[str],
    *,
    mc_samples: int = 32,
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    """Score every candidate as the completion of every prompt; return how often the reference ranks first.

    The score is log p(candidate | prompt) summed over the candidate's
    tokens: exact for an ARM, the Monte Carlo ELBO with mc_samples draws for
    an MDM (draws shared by the candidates of a prompt). A model that holds
    a fact in the asked direction ranks its reference above the split's other
    completions even when it cannot write it out. Chance is 1 / len(candidates).
    """
    from smdm.evaluate.likelihood import arm_loglikelihood, mdm_mc_loglikelihood

    if any(reference not in candidates for reference in references):
        raise ValueError(
            "every reference must be one of the candidates; pass the distinct completions of the whole split"
        )
    kind = model.config.kind
    encoded = [tokenizer.encode(candidate) for candidate in candidates]
    requests = [(encode_prompt(tokenizer, prompt, kind), ids) for prompt in prompts for ids in encoded]
    if model.config.is_mdm:
        scores = mdm_mc_loglikelihood(model, requests, mc_samples=mc_samples, batch_size=batch_size, seed=seed)
    else:
        scores = [score for score, _ in arm_loglikelihood(model, requests, batch_size=batch_size)]
    table = torch.tensor(scores, dtype=torch.float64).view(len(prompts), len(candidates))  # (Q, C)
    truth = torch.tensor([candidates.index(reference) for reference in references])
    correct = table.gather(1, truth[:, None])  # (Q, 1)
    # Rank 1 is the best; a tie with the reference counts against it.
    ranks = (table > correct).sum(dim=1) + (table == correct).sum(dim=1)
    return {"candidates": len(candidates), "top1": (ranks == 1).double().mean().item(),
            "mean_rank": ranks.double().mean().item(), "chance_top1": 1 / len(candidates),
            "estimator": "mc_elbo" if model.config.is_mdm else "exact", "mc_samples": mc_samples}


def report_markdown(results: dict, checkpoint: str) -> str:
    ranked = any("ranking" in metrics for metrics in results["splits"].values())
    header = "| split | question | trained direction | n | skipped | exact match | BLEU |"
    rule = "|---|---|---|---:|---:|---:|---:|"
    if ranked:
        header += " top-1 of candidates | mean rank |"
        rule += "---:|---:|"
    lines = ["# Reversal curse", "", f"Checkpoint: `{checkpoint}`", "", header, rule]
    for split, metrics in results["splits"].items():
        line = (f"| {split} | {metrics['direction']} | {'yes' if metrics['trained_direction'] else 'no'} | "
                f"{metrics['n']} | {metrics['skipped']} | {metrics['exact_match']:.3f} | {metrics['bleu']:.2f} |")
        if ranked:
            ranking = metrics.get("ranking")
            line += (f" {ranking['top1']:.3f} (chance {ranking['chance_top1']:.3f}) | {ranking['mean_rank']:.1f} of "
                     f"{ranking['candidates']} |" if ranking else " | |")
        lines.append(line)
    return "\n".join(lines)
