"""`smdm evaluate --tasks ...` and `smdm evaluate --text FILE`: the command-line side of zero_shot.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_task_files(items: list[str]) -> dict[str, str]:
    files = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise ValueError(f"invalid --task-file {item!r}; write TASK=FILE, for example race=race_test.jsonl")
        files[task] = path
    return files


def run_zero_shot(args: argparse.Namespace) -> int:
    from smdm.evaluate.harness import SmdmLM
    from smdm.evaluate.zero_shot import read_text, run_tasks, text_perplexity

    lm = SmdmLM(
        checkpoint=args.checkpoint, device=args.device, batch_size=args.batch_size,
        likelihood=getattr(args, "likelihood", "mc"), mc_samples=args.mc_samples or (128 if args.tasks else 16),
        mc_scheme=getattr(args, "mc_scheme", "balanced"), cfg=args.cfg, seed=args.seed,
    )
    if args.text:
        result = text_perplexity(lm, read_text(args.text))
        result.update(checkpoint=args.checkpoint, text=args.text)
        print(json.dumps(result, indent=2))
        return 0

    from lm_eval.utils import handle_non_serializable, make_table

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    results = run_tasks(lm, args.tasks, limit=limit, data_dir=args.benchmark_dir,
                        task_files=parse_task_files(args.task_file))
    print(make_table(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=handle_non_serializable), encoding="utf-8")
    return 0
