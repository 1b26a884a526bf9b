"""Zero-shot tasks through lm-eval's evaluator, and the perplexity of a text file.

Both load a checkpoint into the `smdm` lm-eval model (smdm.evaluate.harness),
so the numbers equal those of `smdm-lm-eval run --model smdm ...`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from smdm.data.corpus import read_text_file
from smdm.evaluate.offline_tasks import OFFLINE_TASKS, TASKS_DIR


def parse_task_list(tasks: str | Sequence[str]) -> list[str]:
    """Split "a,b" into names and check them against the offline tasks."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [name for name in names if name not in OFFLINE_TASKS]
    if not names or unknown:
        raise ValueError(f"unknown tasks {unknown or tasks!r}; choose from {', '.join(OFFLINE_TASKS)}")
    return names


def run_tasks(
    lm,
    tasks: str | Sequence[str],
    *,
    limit: int | float | None = None,
    data_dir: str | Path | None = None,
    task_files: Mapping[str, str | Path] | None = None,
    bootstrap_iters: int = 1000,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate an lm-eval model on offline tasks; return lm-eval's result dict.

    data_dir: folder with the benchmark files (see smdm.evaluate.offline_tasks);
    task_files: per-task file overrides, for example {"race": "race_test.jsonl"}.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = parse_task_list(tasks)
    metadata: dict[str, Any] = {}
    if data_dir is not None:
        metadata["data_dir"] = str(data_dir)
    for task, path in (task_files or {}).items():
        parse_task_list([task])
        metadata[f"{task}_file"] = str(path)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    return simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager,
                           bootstrap_iters=bootstrap_iters, log_samples=log_samples)


def text_perplexity(lm, text: str) -> dict[str, Any]:
    """Score a whole text with lm-eval's rolling windows; return its loss (nats per token) and perplexity.

    For an MDM the value is the Monte Carlo ELBO, so "perplexity" estimates
    an upper bound on the perplexity and "bound" is True. For an ARM it is exact.
    """
    n_tokens = len(lm.tok_encode(text))
    if n_tokens == 0:
        raise ValueError("the text is empty after tokenisation; nothing to score")
    from lm_eval.api.instance import Instance

    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0,
                       metadata=("text", 0, 1))
    (loglikelihood,) = lm.loglikelihood_rolling([request])
    nll = -loglikelihood / n_tokens
    return {
        "kind": lm.model.config.kind,
        "tokens": n_tokens,
        "windows": len(lm.rolling_windows(text)),
        "loss": nll,
        "perplexity": math.exp(min(nll, 700.0)),
        "bound": lm.is_mdm,
        "mc_samples": lm.mc_samples if lm.is_mdm else None,
    }


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    return read_text_file(path)
