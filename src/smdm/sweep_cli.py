"""`smdm sweep plan|run|fit|plot`: the IsoFLOP scaling study from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

TRAIN_OVERRIDES = (
    ("seq_len", int), ("global_batch", int), ("micro_batch", int), ("lr", float), ("min_lr", float),
    ("warmup_fraction", float), ("min_warmup_steps", int), ("weight_decay", float), ("grad_clip", float),
    ("ssl_ratio", float), ("checkpoint_interval", int), ("seed", int), ("precision", str),
)


def add_sweep(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sweep_command", required=True, metavar="COMMAND")

    plan = sub.add_parser("plan", help="write a sweep file: the runs of each budget, with steps and tokens")
    plan.add_argument("--recipe", default="tiny",
                      help="built-in recipe (tiny: CPU-sized models; paper: the paper's 30 sizes) or a YAML file")
    plan.add_argument("--out", required=True, help="sweep file to write (YAML)")
    plan.add_argument("--budgets", type=float, nargs="+", default=None, help="compute budgets in FLOPs (C = 6 N D)")
    plan.add_argument("--sizes", nargs="+", default=None, help="size names to choose from (see `smdm sizes`)")
    plan.add_argument("--kinds", nargs="+", choices=("mdm", "arm"), default=None)
    plan.add_argument("--sizes-per-budget", type=int, default=None, help="sizes trained at each budget")
    plan.add_argument("--tokens-per-param", type=float, default=None,
                      help="tokens per parameter at the expected optimum; centres each budget's sizes")
    plan.add_argument("--min-steps", type=int, default=None, help="leave out runs shorter than this many steps")
    for key, kind in TRAIN_OVERRIDES:
        plan.add_argument("--" + key.replace("_", "-"), type=kind, default=None, help=f"training setting {key}")
    plan.add_argument("--mc-samples", type=int, default=None,
                      help="Monte Carlo draws per sequence of the MDM's final loss")
    plan.add_argument("--eval-sequences", type=int, default=None, help="validation windows of the final loss")
    plan.set_defaults(sweep_run=run_plan)

    run = sub.add_parser("run", help="train the runs of a sweep file that have no result yet")
    run.add_argument("--sweep", required=True, help="sweep file from `smdm sweep plan`")
    run.add_argument("--data", required=True, help="prepared data folder (from `smdm prepare`)")
    run.add_argument("--out", default=None,
                     help="folder for runs/ and results.jsonl (default: the sweep file's folder)")
    run.add_argument("--jobs", type=int, default=1, help="runs trained at once, in separate processes")
    run.add_argument("--threads", type=int, default=0,
                     help="torch threads per run (0: torch's default with one job, 1 with several)")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    run.add_argument("--only", nargs="+", default=None, help="train only these run ids")
    run.set_defaults(sweep_run=run_run)

    fit = sub.add_parser("fit", help="fit IsoFLOP parabolas, power laws and the compute gap")
    fit.add_argument("--results", required=True, help="results.jsonl from `smdm sweep run`")
    fit.add_argument("--out", default=None, help="JSON file for the fit (default: fit.json next to the results)")
    fit.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the confidence intervals")
    fit.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    fit.add_argument("--confidence", type=float, default=0.95, help="level of the confidence intervals")
    fit.add_argument("--budgets", type=float, nargs="+", default=None,
                     help="fit only the results of these budgets (default: all budgets in the results)")
    fit.set_defaults(sweep_run=run_fit)

    plot = sub.add_parser("plot", help="PNG figures: IsoFLOP curves and optimal loss against compute")
    plot.add_argument("--results", required=True, help="results.jsonl from `smdm sweep run`")
    plot.add_argument("--fit", default=None, help="fit JSON (default: fit.json next to the results; fitted if absent)")
    plot.add_argument("--out", default=None, help="folder for the PNG files (default: the results' folder)")
    plot.set_defaults(sweep_run=run_plot)


def run_sweep_verb(args: argparse.Namespace) -> int:
    return args.sweep_run(args)


def run_plan(args: argparse.Namespace) -> int:
    from smdm.scaling import load_recipe, plan_sweep, write_sweep

    train = {key: getattr(args, key) for key, _ in TRAIN_OVERRIDES if getattr(args, key) is not None}
    evaluation = {}
    if args.mc_samples is not None:
        evaluation["mc_samples"] = args.mc_samples
    if args.eval_sequences is not None:
        evaluation["max_sequences"] = args.eval_sequences
    sweep = plan_sweep(
        load_recipe(args.recipe), budgets=args.budgets, sizes=args.sizes, kinds=args.kinds,
        sizes_per_budget=args.sizes_per_budget, tokens_per_param=args.tokens_per_param, min_steps=args.min_steps,
        train=train or None, eval=evaluation or None,
    )
    path = write_sweep(sweep, args.out)
    print(f"{'run':<28} {'N':>12} {'budget':>10} {'steps':>8} {'tokens':>12}")
    for run in sweep["runs"]:
        print(f"{run['id']:<28} {run['n_non_embedding']:>12,} {run['budget']:>10.3g} "
              f"{run['steps']:>8,} {run['tokens']:>12,}")
    print(f"wrote {len(sweep['runs'])} runs to {path}")
    return 0


def run_run(args: argparse.Namespace) -> int:
    from smdm.scaling import run_sweep

    report = run_sweep(args.sweep, args.data, args.out, jobs=args.jobs, device=args.device, threads=args.threads,
                       only=args.only)
    print(json.dumps({"results": str(report.results_path), "finished": report.finished, "skipped": report.skipped,
                      "interrupted": report.interrupted, "failed": report.failed}, indent=2))
    return 1 if report.failed or report.interrupted else 0


def run_fit(args: argparse.Namespace) -> int:
    from smdm.scaling import fit_results, format_fit, read_results

    rows = read_results(args.results)
    if not rows:
        raise FileNotFoundError(f"no results in {args.results}; run `smdm sweep run` first")
    if args.budgets:
        present = sorted({float(row["budget"]) for row in rows})
        missing = [b for b in args.budgets if not any(math.isclose(b, p, rel_tol=1e-9) for p in present)]
        if missing:
            raise ValueError(f"--budgets {missing} have no results; the results contain budgets {present}")
        rows = [row for row in rows if any(math.isclose(row["budget"], b, rel_tol=1e-9) for b in args.budgets)]
    fit = fit_results(rows, bootstrap=args.bootstrap, seed=args.seed, confidence=args.confidence)
    out = Path(args.out) if args.out else Path(args.results).with_name("fit.json")
    out.write_text(json.dumps(fit, indent=2), encoding="utf-8")
    print(format_fit(fit))
    print(f"wrote {out}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from smdm.plots import plot_sweep
    from smdm.scaling import fit_results, read_results

    rows = read_results(args.results)
    if not rows:
        raise FileNotFoundError(f"no results in {args.results}; run `smdm sweep run` first")
    fit_path = Path(args.fit) if args.fit else Path(args.results).with_name("fit.json")
    if fit_path.is_file():
        fit = json.loads(fit_path.read_text(encoding="utf-8"))
    elif args.fit:
        raise FileNotFoundError(f"fit file {fit_path} not found; write it with `smdm sweep fit`")
    else:
        fit = fit_results(rows, bootstrap=0)
    out = Path(args.out) if args.out else Path(args.results).parent
    for path in plot_sweep(rows, fit, out):
        print(f"wrote {path}")
    return 0
