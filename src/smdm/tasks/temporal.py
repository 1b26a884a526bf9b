"""Temporal shift: per-token loss of dated text grouped by period, MDM bound next to ARM perplexity.

The MDM's number is the Monte Carlo NELBO over fixed windows, which bounds
its perplexity from above. The ARM's number is its exact perplexity on the
same windows (plus one target token). Both are per token of the model's own tokenizer, so
models compare directly only when they share a tokenizer.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from smdm.data.tokenizer import Tokenizer
from smdm.evaluate.validation import validation_loss
from smdm.model import Transformer

SOURCES = {"sotu": "sotu.jsonl", "parlspeech": "parlspeech_v2_sample_houseofcommons.csv"}


def read_dated_texts(data_dir: str | Path, source: str) -> list[tuple[int, str]]:
    """Return (year, text) pairs of a source: "sotu" (State of the Union) or "parlspeech" (House of Commons)."""
    if source not in SOURCES:
        raise ValueError(f"unknown temporal source {source!r}; choose from {sorted(SOURCES)}")
    path = Path(data_dir) / SOURCES[source]
    if not path.is_file():
        raise FileNotFoundError(f"temporal data not found: {path}")
    if source == "sotu":
        with open(path, encoding="utf-8") as handle:
            return [(int(record["year"]), record["text"]) for record in map(json.loads, handle) if record]
    # Speeches can exceed the csv module's default field limit of 128 KiB.
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as handle:
        return [(int(row["date"][:4]), row["text"]) for row in csv.DictReader(handle)]


def group_by_period(texts: Sequence[tuple[int, str]], period_years: int) -> dict[int, list[str]]:
    """Group texts by period start year (year // period_years * period_years)."""
    if period_years <= 0:
        raise ValueError(f"period_years={period_years} must be positive")
    groups: dict[int, list[str]] = defaultdict(list)
    for year, text in texts:
        groups[year // period_years * period_years].append(text)
    return dict(sorted(groups.items()))


def period_tokens(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Encode a period's texts as one stream, each text followed by EOS."""
    ids: list[int] = []
    for encoded in tokenizer.encode_batch(list(texts)):
        ids.extend(encoded)
        ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=np.int64)


def evaluate_periods(
    model: Transformer,
    tokenizer: Tokenizer,
    groups: dict[int, list[str]],
    *,
    seq_len: int,
    max_windows: int = 16,
    mc_samples: int = 8,
    batch_size: int = 8,
    seed: int = 1234,
) -> list[dict]:
    """Return one row per period with windows, tokens, loss (nats per token) and (bound on) perplexity."""
    rows = []
    for period, texts in groups.items():
        tokens = period_tokens(tokenizer, texts)
        if len(tokens) < seq_len + 1:
            rows.append({"period": period, "documents": len(texts), "skipped": f"only {len(tokens)} tokens"})
            continue
        result = validation_loss(model, tokens, seq_len, max_sequences=max_windows, batch_size=batch_size,
                                 mc_samples=mc_samples, seed=seed)
        rows.append({"period": period, "documents": len(texts), "windows": result["sequences"],
                     "tokens": result["tokens"], "loss": result["loss"], "perplexity": result["perplexity"],
                     "bound": result["bound"]})
    return rows


def report_markdown(results: dict) -> str:
    lines = ["# Temporal shift", "",
             "MDM values are upper bounds on perplexity (NELBO); ARM values are exact perplexities.", ""]
    for source, models in results["sources"].items():
        lines += [f"## {source}", "", "| model | kind | period | documents | windows | loss (nats/token) | perplexity |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for name, entry in models.items():
            for row in entry["periods"]:
                if "skipped" in row:
                    continue
                marker = "<= " if row["bound"] else ""
                lines.append(f"| {name} | {entry['kind']} | {row['period']} | {row['documents']} | {row['windows']} | "
                             f"{row['loss']:.4f} | {marker}{row['perplexity']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot_periods(results: dict, path: str | Path) -> Path:
    """Plot (bound on) perplexity against period start, one panel per source and one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    sources = list(results["sources"])
    figure, axes = plt.subplots(1, len(sources), figsize=(6 * len(sources), 4), squeeze=False)
    for axis, source in zip(axes[0], sources):
        for name, entry in results["sources"][source].items():
            rows = [row for row in entry["periods"] if "skipped" not in row]
            label = f"{name} ({entry['kind']}{', bound' if entry['kind'] == 'mdm' else ''})"
            axis.plot([row["period"] for row in rows], [row["perplexity"] for row in rows], marker="o", label=label)
        axis.set_title(source)
        axis.set_xlabel("period start (year)")
        axis.set_ylabel("perplexity (MDM: upper bound)")
        axis.set_yscale("log")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
