"""IsoFLOP scaling sweeps for MDMs and ARMs: plan the grid, run it, fit the laws.

Method (Nie et al., "Scaling up Masked Diffusion Models on Text", arXiv
2410.18514, following Hoffmann et al., arXiv 2203.15556): a run is named by a
model size N (non-embedding parameters) and a compute budget C; it trains on
D = C / (6 N) tokens. For each budget several sizes are trained; validation
loss against log N is fitted with a parabola whose vertex gives the
compute-optimal N*(C) and loss L*(C). Power laws L* = A C^alpha,
N* = G C^a and D* = C / (6 N*) are then fitted across budgets for each kind.

A sweep file (YAML) lists every run with its size, budget, steps and tokens,
plus the shared training and evaluation settings; it is meant to be read and
edited before `smdm sweep run`.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import multiprocessing
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from smdm.config import MODEL_KINDS, PAPER_SIZES, TINY_SIZES, ModelConfig, TrainConfig

log = logging.getLogger(__name__)

RECIPES = ("tiny", "paper")
RESULTS_FILE = "results.jsonl"
RUNS_DIR = "runs"
EVAL_DEFAULTS = {"max_sequences": 256, "batch_size": 64, "mc_samples": 16, "seed": 1234}
# Training settings that a sweep fixes per run, so a sweep file may not set them globally.
PER_RUN_TRAIN_KEYS = ("max_steps", "max_tokens", "flops", "device", "eval_interval")


# Recipes and planning.
def load_recipe(name_or_path: str) -> dict:
    """Load a sweep recipe: the name of a built-in one ("tiny", "paper") or a YAML file."""
    if name_or_path in RECIPES:
        text = resources.files("smdm.recipes").joinpath(f"{name_or_path}.yaml").read_text(encoding="utf-8")
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {name_or_path!r} is neither a built-in recipe {RECIPES} nor a file")
        text = path.read_text(encoding="utf-8")
    recipe = yaml.safe_load(text)
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {name_or_path!r} must be a YAML mapping")
    return recipe


def size_params(name: str) -> int:
    """Non-embedding parameters of a named size (independent of vocabulary and context)."""
    return ModelConfig.from_name(name).n_non_embedding


def expected_optimal_params(budget: float, tokens_per_param: float) -> float:
    """Return N* = sqrt(C / (6 r)), the size that trains on r tokens per parameter at budget C = 6 N D."""
    return math.sqrt(budget / (6.0 * tokens_per_param))


def pick_sizes(sizes: list[str], budget: float, count: int, tokens_per_param: float) -> list[str]:
    """Pick `count` consecutive sizes (sorted by N) whose middle in log N is nearest the expected optimum."""
    ordered = sorted(sizes, key=size_params)
    if count >= len(ordered):
        return ordered
    target = math.log(expected_optimal_params(budget, tokens_per_param))
    logs = [math.log(size_params(name)) for name in ordered]
    best = min(
        range(len(ordered) - count + 1),
        key=lambda first: abs((logs[first] + logs[first + count - 1]) / 2 - target),
    )
    return ordered[best : best + count]


def run_id(kind: str, budget: float, size: str) -> str:
    return f"{kind}-C{budget:.3g}-{size}"


def plan_runs(
    budgets: list[float],
    sizes: list[str],
    train: dict,
    *,
    kinds: tuple[str, ...] = MODEL_KINDS,
    sizes_per_budget: int = 5,
    tokens_per_param: float = 20.0,
    min_steps: int = 1,
) -> list[dict]:
    """Return the runs of an IsoFLOP grid: for each budget and kind, the sizes around the expected optimum.

    Steps follow from C = 6 N D and the tokens per optimiser step
    (TrainConfig.resolve_steps, which counts the expected cut of stochastic
    sequence length for an MDM). Sizes that would train fewer than min_steps
    steps are left out.
    """
    unknown = [name for name in sizes if name not in {**PAPER_SIZES, **TINY_SIZES}]
    if unknown:
        raise ValueError(f"unknown model sizes {unknown}; see `smdm sizes` for the names")
    bad_kinds = [kind for kind in kinds if kind not in MODEL_KINDS]
    if bad_kinds:
        raise ValueError(f"unknown kinds {bad_kinds}; use {MODEL_KINDS}")
    if not budgets or any(b <= 0 for b in budgets):
        raise ValueError(f"budgets {budgets} must be a non-empty list of positive FLOP counts")
    if sizes_per_budget < 1:
        raise ValueError(f"sizes_per_budget={sizes_per_budget} must be at least 1")
    runs = []
    for budget in sorted(budgets):
        chosen = pick_sizes(sizes, budget, sizes_per_budget, tokens_per_param)
        for kind in kinds:
            config = TrainConfig.from_dict({**train, "flops": budget, "max_steps": 0, "max_tokens": 0})
            per_step = config.expected_tokens_per_step() if kind == "mdm" else config.global_batch * config.seq_len
            for size in chosen:
                n = size_params(size)
                steps = config.resolve_steps(n, kind)
                if steps < min_steps:
                    log.info("leaving out %s %s at C=%.3g: %d steps < min_steps=%d",
                             kind.upper(), size, budget, steps, min_steps)
                    continue
                runs.append({
                    "id": run_id(kind, budget, size),
                    "kind": kind,
                    "model": size,
                    "budget": float(budget),
                    "n_non_embedding": n,
                    "steps": steps,
                    "tokens": round(steps * per_step),
                })
    return runs


def plan_sweep(recipe: dict, **overrides: Any) -> dict:
    """Build a sweep (settings plus the list of runs) from a recipe, with optional overrides.

    Overrides: budgets, sizes, kinds, sizes_per_budget, tokens_per_param,
    min_steps, and train (a dict merged into the recipe's training settings).
    """
    settings = {**recipe}
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "train":
            settings["train"] = {**settings.get("train", {}), **value}
        elif key == "eval":
            settings["eval"] = {**settings.get("eval", {}), **value}
        else:
            settings[key] = value
    train = dict(settings.get("train", {}))
    fixed = sorted(set(train) & set(PER_RUN_TRAIN_KEYS))
    if fixed:
        raise ValueError(f"training settings {fixed} are set per run by the sweep; remove them from the recipe")
    TrainConfig.from_dict(train)  # validate early
    runs = plan_runs(
        [float(b) for b in settings["budgets"]],
        list(settings["sizes"]),
        train,
        kinds=tuple(settings.get("kinds", MODEL_KINDS)),
        sizes_per_budget=int(settings.get("sizes_per_budget", 5)),
        tokens_per_param=float(settings.get("tokens_per_param", 20.0)),
        min_steps=int(settings.get("min_steps", 1)),
    )
    return {
        "family": settings.get("family", "custom"),
        "budgets": sorted(float(b) for b in settings["budgets"]),
        "kinds": list(settings.get("kinds", MODEL_KINDS)),
        "sizes_per_budget": int(settings.get("sizes_per_budget", 5)),
        "tokens_per_param": float(settings.get("tokens_per_param", 20.0)),
        "min_steps": int(settings.get("min_steps", 1)),
        "train": train,
        "eval": {**EVAL_DEFAULTS, **settings.get("eval", {})},
        "runs": runs,
    }


def write_sweep(sweep: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# IsoFLOP sweep: every run trains `model` for `steps` optimiser steps (`tokens` tokens),\n"
        "# so that 6 * n_non_embedding * tokens is about `budget` FLOPs. Edit runs or settings, then\n"
        "# `smdm sweep run --sweep THIS_FILE --data PREPARED_DATA`.\n"
    )
    path.write_text(header + yaml.safe_dump(sweep, sort_keys=False, width=120), encoding="utf-8")
    return path


def read_sweep(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} not found; write one with `smdm sweep plan`")
    sweep = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(sweep, dict) or not isinstance(sweep.get("runs"), list):
        raise ValueError(f"{path} is not a sweep file: it needs a `runs` list (write one with `smdm sweep plan`)")
    ids = [run["id"] for run in sweep["runs"]]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{path} lists runs {duplicates} more than once; give each run its own id")
    for run in sweep["runs"]:
        missing = [key for key in ("id", "kind", "model", "budget", "steps") if key not in run]
        if missing:
            raise ValueError(f"run {run.get('id', run)} in {path} lacks {missing}")
    return sweep


# Running.
def read_results(path: str | Path) -> list[dict]:
    """Read the results file (one JSON object per line); a missing file has no results."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                message = f"{path} line {number} is not valid JSON ({error}); delete or fix that line"
                raise ValueError(message) from error
    return rows


def _append_result(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()


# Set in a worker process once a signal has stopped one of its runs.
_stopped_by_signal = False


def train_one(run: dict, sweep: dict, data_dir: str, run_dir: str, device: str, threads: int) -> dict | None:
    """Train (or resume) one run of a sweep and return its results row with the final validation loss.

    The final loss is measured apart from the trainer's periodic validation,
    with the sweep's evaluation settings: the same windows and, for an MDM,
    the same seed and number of Monte Carlo draws for every run, so that runs
    are compared on identical noise. Returns None when training was stopped
    by a signal before its last step.
    """
    import torch

    from smdm.data.shards import TokenData
    from smdm.evaluate.validation import validation_loss
    from smdm.train import Trainer

    global _stopped_by_signal
    if _stopped_by_signal:
        return None
    if threads > 0:
        torch.set_num_threads(threads)
    run_path = Path(run_dir)
    run_path.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_path / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    smdm_log = logging.getLogger("smdm")
    smdm_log.addHandler(handler)
    smdm_log.setLevel(logging.INFO)
    try:
        started = time.time()
        data = TokenData(data_dir)
        train_settings = dict(sweep["train"])
        model_config = ModelConfig.from_name(
            run["model"], kind=run["kind"], vocab_size=data.vocab_size, block_size=train_settings["seq_len"]
        )
        # The trainer's own validation runs once at the end with minimal settings; the
        # comparable final loss is measured below.
        train_config = TrainConfig.from_dict({
            **train_settings, "max_steps": int(run["steps"]), "eval_interval": int(run["steps"]),
            "eval_batches": 1, "eval_mc_samples": 1, "device": device,
        })
        trainer = Trainer(model_config, train_config, data_dir, run_path, resume=True)
        resumed_from = trainer.step
        result = trainer.fit()
        train_seconds = time.time() - started
        if result.steps < trainer.total_steps:
            # The trainer stopped on SIGINT/SIGTERM after saving a checkpoint; the next sweep run resumes it.
            # Later runs queued in this worker process return at once.
            _stopped_by_signal = True
            return None

        evaluation = {**EVAL_DEFAULTS, **sweep.get("eval", {})}
        final = validation_loss(
            trainer.model, trainer.val_tokens, train_config.seq_len,
            max_sequences=int(evaluation["max_sequences"]), batch_size=int(evaluation["batch_size"]),
            mc_samples=int(evaluation["mc_samples"]), seed=int(evaluation["seed"]), precision=trainer.precision,
        )
        return {
            "id": run["id"], "kind": run["kind"], "model": run["model"], "budget": float(run["budget"]),
            "n_non_embedding": model_config.n_non_embedding, "n_params": model_config.n_params,
            "steps": result.steps, "tokens": result.tokens,
            "flops_6nd": 6.0 * model_config.n_non_embedding * result.tokens,
            "val_loss": final["loss"], "val_bound": final["bound"], "val_sequences": final["sequences"],
            "mc_samples": int(evaluation["mc_samples"]) if final["bound"] else 0, "eval_seed": int(evaluation["seed"]),
            "resumed_from_step": resumed_from, "wall_s": round(time.time() - started, 2),
            "train_wall_s": round(train_seconds, 2), "device": str(trainer.device), "precision": trainer.precision,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    finally:
        smdm_log.removeHandler(handler)
        handler.close()


@dataclass
class SweepRunReport:
    results_path: Path
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    interrupted: list[str] = field(default_factory=list)


def run_sweep(
    sweep_path: str | Path,
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    jobs: int = 1,
    device: str = "auto",
    threads: int = 0,
    only: list[str] | None = None,
) -> SweepRunReport:
    """Run every run of a sweep file that has no row in the results file yet.

    Runs go in order of budget (cheapest first) so that a partial sweep contains
    whole budgets. An interrupted run resumes from its latest checkpoint.
    With jobs > 1, runs train in that many worker processes at once; the
    results file is written only by this process. threads sets torch's
    intra-op threads per run (0: torch's default with one job, 1 with several).
    """
    global _stopped_by_signal
    _stopped_by_signal = False  # with jobs == 1 the runs train in this process; a new sweep starts afresh
    sweep_path = Path(sweep_path)
    sweep = read_sweep(sweep_path)
    data_dir = Path(data_dir)
    if not (data_dir / "meta.json").is_file():
        raise FileNotFoundError(f"{data_dir} is not a prepared data folder; run `smdm prepare --out {data_dir}` first")
    if jobs < 1:
        raise ValueError(f"jobs={jobs} must be at least 1")
    out = Path(out_dir) if out_dir is not None else sweep_path.parent
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    report = SweepRunReport(results_path)

    done = {row["id"] for row in read_results(results_path)}
    runs = sorted(sweep["runs"], key=lambda r: (float(r["budget"]), size_params(r["model"]), r["kind"]))
    if only:
        unknown = sorted(set(only) - {run["id"] for run in runs})
        if unknown:
            raise ValueError(f"--only names runs {unknown} that are not in {sweep_path}")
        runs = [run for run in runs if run["id"] in only]
    pending = []
    for run in runs:
        if run["id"] in done:
            report.skipped.append(run["id"])
        else:
            pending.append(run)
    log.info("sweep %s: %d runs to train, %d already finished", sweep_path, len(pending), len(report.skipped))
    if threads == 0 and jobs > 1:
        threads = 1

    def arguments(run: dict) -> tuple:
        return (run, sweep, str(data_dir), str(out / RUNS_DIR / run["id"]), device, threads)

    def record(run: dict, row: dict | None) -> None:
        if row is None:
            report.interrupted.append(run["id"])
            log.warning("run %s stopped before its last step; run the sweep again to resume it", run["id"])
            return
        _append_result(results_path, row)
        report.finished.append(run["id"])
        log.info("finished %s: validation loss %.4f in %.0f s", run["id"], row["val_loss"], row["wall_s"])

    def fail(run: dict, error: Exception) -> None:
        # One failed run (a diverged loss, say) must not lose the other runs' results.
        report.failed[run["id"]] = f"{type(error).__name__}: {error}"
        log.error("run %s failed: %s", run["id"], report.failed[run["id"]])

    def finish(run: dict, result) -> bool:
        """Record the outcome of result() for one run; return True when the sweep must stop (an interrupted run)."""
        try:
            row = result()
        except Exception as error:  # noqa: BLE001 (any failure of one run is recorded, see fail)
            fail(run, error)
            return False
        record(run, row)
        return row is None

    if jobs == 1:
        for run in pending:
            log.info("training %s (%d steps)", run["id"], run["steps"])
            if finish(run, lambda: train_one(*arguments(run))):
                break
        return report

    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context)
    try:
        futures = {}
        for run in pending:
            log.info("queueing %s (%d steps)", run["id"], run["steps"])
            futures[pool.submit(train_one, *arguments(run))] = run
        for future in concurrent.futures.as_completed(futures):
            if finish(futures[future], future.result):
                break
    except KeyboardInterrupt:
        # Ctrl-C reaches the workers too: each saves a checkpoint at the end of its step.
        # Queued runs must not start afterwards.
        log.warning("interrupted: waiting for running runs to save a checkpoint; run the sweep again to resume")
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True, cancel_futures=True)
    return report


# Fitting.
def fit_isoflop(params: list[float], losses: list[float]) -> dict:
    """Fit loss = a x^2 + b x + c with x = log10 N at one budget and return the optimum.

    The optimum is the parabola's vertex x* = -b / (2a) when the parabola opens
    upward (a > 0) and x* lies within the sampled sizes ("bracketed").
    Otherwise (a <= 0, a vertex outside the sizes, or fewer than three sizes)
    the lowest observed loss is taken and marked as not bracketed, because a
    vertex extrapolated from a few points can land orders of magnitude away.
    """
    x = np.log10(np.asarray(params, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    if len(x) < 3 or len(np.unique(x)) < 3:
        best = int(np.argmin(y))
        return {"x_opt": float(x[best]), "loss_opt": float(y[best]), "coefficients": None, "convex": False,
                "bracketed": False, "method": "lowest observed (fewer than 3 sizes)"}
    a, b, c = np.polyfit(x, y, 2)
    if a <= 0:
        best = int(np.argmin(y))
        return {"x_opt": float(x[best]), "loss_opt": float(y[best]), "coefficients": [float(a), float(b), float(c)],
                "convex": False, "bracketed": False, "method": "lowest observed (parabola opens downward)"}
    x_opt = -b / (2 * a)
    if not x.min() <= x_opt <= x.max():
        best = int(np.argmin(y))
        return {"x_opt": float(x[best]), "loss_opt": float(y[best]), "coefficients": [float(a), float(b), float(c)],
                "convex": True, "bracketed": False,
                "method": f"lowest observed (vertex at N={10**x_opt:.3g} lies outside the sizes)"}
    return {"x_opt": float(x_opt), "loss_opt": float(c - b * b / (4 * a)),
            "coefficients": [float(a), float(b), float(c)], "convex": True, "bracketed": True,
            "method": "parabola vertex"}


def fit_power_law(budgets: list[float], values: list[float]) -> dict:
    """Fit value = coefficient * C^exponent by least squares on log10 value against log10 C."""
    if len(budgets) < 2:
        return {"exponent": None, "coefficient": None, "log10_coefficient": None}
    slope, intercept = np.polyfit(np.log10(budgets), np.log10(values), 1)
    return {"exponent": float(slope), "coefficient": float(10**intercept), "log10_coefficient": float(intercept)}


def _group_by_budget(rows: list[dict]) -> dict[float, list[dict]]:
    groups: dict[float, list[dict]] = {}
    for row in rows:
        groups.setdefault(float(row["budget"]), []).append(row)
    return {budget: sorted(groups[budget], key=lambda r: r["n_non_embedding"]) for budget in sorted(groups)}


def _optima(groups: dict[float, list[dict]], losses: dict[float, np.ndarray]) -> list[dict]:
    optima = []
    for budget, group in groups.items():
        fit = fit_isoflop([r["n_non_embedding"] for r in group], list(losses[budget]))
        n_opt = 10 ** fit["x_opt"]
        optima.append({"budget": budget, "sizes": len(group), "n_opt": n_opt, "d_opt": budget / (6 * n_opt), **fit})
    return optima


def _laws(optima: list[dict]) -> dict:
    budgets = [o["budget"] for o in optima]
    return {
        "loss": fit_power_law(budgets, [o["loss_opt"] for o in optima]),
        "params": fit_power_law(budgets, [o["n_opt"] for o in optima]),
        "tokens": fit_power_law(budgets, [o["d_opt"] for o in optima]),
    }


def _shared_exponent_gap(optima_by_kind: dict[str, list[dict]]) -> dict:
    """Fit log10 L* = alpha log10 C + b_kind with one alpha for both kinds; return alpha and the compute gap.

    With a shared exponent the gap is constant: the MDM reaches the ARM's loss
    with 10^((b_arm - b_mdm) / alpha) times the ARM's compute.
    """
    rows, targets = [], []
    for index, kind in enumerate(("arm", "mdm")):
        for optimum in optima_by_kind[kind]:
            rows.append([math.log10(optimum["budget"]), 1.0 - index, float(index)])
            targets.append(math.log10(optimum["loss_opt"]))
    solution, *_ = np.linalg.lstsq(np.asarray(rows), np.asarray(targets), rcond=None)
    alpha, b_arm, b_mdm = (float(v) for v in solution)
    gap = 10 ** ((b_arm - b_mdm) / alpha) if alpha != 0 else float("nan")
    return {"exponent": alpha, "log10_coefficient_arm": b_arm, "log10_coefficient_mdm": b_mdm, "gap": gap}


def compute_gap(arm_law: dict, mdm_law: dict, budget: float) -> float:
    """Return C_mdm / C for the compute C_mdm at which the MDM's L*(C) law reaches the ARM's L*(budget)."""
    target = arm_law["log10_coefficient"] + arm_law["exponent"] * math.log10(budget)
    log_c_mdm = (target - mdm_law["log10_coefficient"]) / mdm_law["exponent"]
    return 10 ** (log_c_mdm - math.log10(budget))


def _fit_once(groups_by_kind: dict[str, dict[float, list[dict]]], losses_by_kind: dict[str, dict]) -> dict:
    optima = {kind: _optima(groups, losses_by_kind[kind]) for kind, groups in groups_by_kind.items()}
    laws = {kind: _laws(optima[kind]) for kind in optima}
    result: dict = {"optima": optima, "laws": laws}
    both = {"arm", "mdm"} <= set(optima) and all(len(optima[k]) >= 2 for k in ("arm", "mdm"))
    if both:
        result["shared"] = _shared_exponent_gap(optima)
        budgets = sorted({o["budget"] for k in ("arm", "mdm") for o in optima[k]})
        result["gap_by_budget"] = {b: compute_gap(laws["arm"]["loss"], laws["mdm"]["loss"], b) for b in budgets}
    return result


def _interval(samples: list[float], confidence: float) -> list[float] | None:
    values = np.asarray([s for s in samples if s is not None and np.isfinite(s)], dtype=np.float64)
    if len(values) < 2:
        return None
    tail = (1 - confidence) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def fit_results(rows: list[dict], *, bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Fit a sweep's results: IsoFLOP optima per budget, power laws per kind and the MDM/ARM compute gap.

    Confidence intervals come from a residual bootstrap: the residuals of each
    kind's IsoFLOP parabolas (scaled by sqrt(n / (n - 3)) for the three fitted
    coefficients) are resampled with replacement onto the fitted losses, and
    the whole fit is repeated.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must lie strictly between 0 and 1")
    if bootstrap < 0:
        raise ValueError(f"bootstrap={bootstrap} must be 0 (no intervals) or a number of resamples")
    kinds = sorted({row["kind"] for row in rows})
    groups_by_kind = {kind: _group_by_budget([r for r in rows if r["kind"] == kind]) for kind in kinds}
    losses_by_kind = {
        kind: {b: np.asarray([r["val_loss"] for r in g], dtype=np.float64) for b, g in groups.items()}
        for kind, groups in groups_by_kind.items()
    }
    point = _fit_once(groups_by_kind, losses_by_kind)

    # Fitted values and scaled residuals per kind, for the residual bootstrap.
    fitted_by_kind, residuals_by_kind = {}, {}
    for kind, groups in groups_by_kind.items():
        fitted, residuals = {}, []
        for budget, group in groups.items():
            y = losses_by_kind[kind][budget]
            x = np.log10([r["n_non_embedding"] for r in group])
            if len(y) > 3:
                coefficients = np.polyfit(x, y, 2)
                fitted[budget] = np.polyval(coefficients, x)
                residuals.extend((y - fitted[budget]) * math.sqrt(len(y) / (len(y) - 3)))
            else:
                fitted[budget] = y  # an exact fit leaves no residual to learn the noise from
        fitted_by_kind[kind], residuals_by_kind[kind] = fitted, np.asarray(residuals)

    samples: list[dict] = []
    rng = np.random.default_rng(seed)
    if bootstrap and all(len(r) for r in residuals_by_kind.values()):
        for _ in range(bootstrap):
            resampled = {
                kind: {b: f + rng.choice(residuals_by_kind[kind], size=len(f)) for b, f in fitted.items()}
                for kind, fitted in fitted_by_kind.items()
            }
            samples.append(_fit_once(groups_by_kind, resampled))

    def interval(path: callable) -> list[float] | None:
        return _interval([path(s) for s in samples], confidence) if samples else None

    out: dict = {"kinds": {}, "bootstrap": {"resamples": len(samples), "seed": seed, "confidence": confidence},
                 "warnings": []}
    for kind in kinds:
        budgets_out = []
        for index, optimum in enumerate(point["optima"][kind]):
            group = groups_by_kind[kind][optimum["budget"]]
            budgets_out.append({
                **optimum,
                "n_opt_ci": interval(lambda s, i=index, k=kind: s["optima"][k][i]["n_opt"]),
                "loss_opt_ci": interval(lambda s, i=index, k=kind: s["optima"][k][i]["loss_opt"]),
                "points": [{"model": r["model"], "n_non_embedding": r["n_non_embedding"], "val_loss": r["val_loss"]}
                           for r in group],
            })
            if not optimum["bracketed"]:
                out["warnings"].append(
                    f"{kind.upper()} at C={optimum['budget']:.3g}: the minimum is not bracketed by the sizes "
                    f"({optimum['method']}, N*={optimum['n_opt']:.3g}); add sizes on that side"
                )
        laws = {}
        for name, law in point["laws"][kind].items():
            laws[name] = {**law, "exponent_ci": interval(lambda s, k=kind, n=name: s["laws"][k][n]["exponent"])}
        out["kinds"][kind] = {"budgets": budgets_out, "laws": laws}
    if "shared" in point:
        shared = point["shared"]
        out["gap"] = {
            "shared_exponent": shared["exponent"],
            "shared_exponent_ci": interval(lambda s: s["shared"]["exponent"]),
            "gap": shared["gap"],
            "gap_ci": interval(lambda s: s["shared"]["gap"]),
            "by_budget": [
                {"budget": b, "gap": g, "gap_ci": interval(lambda s, b=b: s["gap_by_budget"][b])}
                for b, g in point["gap_by_budget"].items()
            ],
        }
    return out


def _format_interval(ci: list[float] | None, spec: str) -> str:
    return f"[{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else "-"


def format_fit(fit: dict) -> str:
    """Render a fit as plain-text tables: optima per budget, exponents and the compute gap."""
    level = f"{fit['bootstrap']['confidence']:.0%}"
    ci_title = f"L* {level} CI"
    lines = [f"{'kind':<5} {'budget':>9} {'sizes':>5} {'N*':>10} {'D*':>10} {'L*':>8}  {ci_title:<18} bracketed"]
    for kind, data in fit["kinds"].items():
        for b in data["budgets"]:
            lines.append(
                f"{kind:<5} {b['budget']:>9.3g} {b['sizes']:>5} {b['n_opt']:>10.3g} {b['d_opt']:>10.3g} "
                f"{b['loss_opt']:>8.4f}  {_format_interval(b['loss_opt_ci'], '.4f'):<18} "
                f"{'yes' if b['bracketed'] else 'NO'}"
            )
    lines.append("")
    lines.append(f"{'kind':<5} {'law':<22} {'exponent':>9}  {level} CI")
    names = {"loss": "L* = A C^alpha", "params": "N* = G C^a", "tokens": "D* = C / (6 N*) ~ C^b"}
    for kind, data in fit["kinds"].items():
        for name, law in data["laws"].items():
            exponent = "-" if law["exponent"] is None else f"{law['exponent']:.4f}"
            lines.append(f"{kind:<5} {names[name]:<22} {exponent:>9}  {_format_interval(law['exponent_ci'], '.4f')}")
    if "gap" in fit:
        gap = fit["gap"]
        lines.append("")
        lines.append(
            f"shared loss exponent {gap['shared_exponent']:.4f} {_format_interval(gap['shared_exponent_ci'], '.4f')}; "
            f"compute gap (MDM compute / ARM compute at equal loss) {gap['gap']:.3g} "
            f"{_format_interval(gap['gap_ci'], '.3g')}"
        )
        for row in gap["by_budget"]:
            lines.append(f"  separate laws, ARM at C={row['budget']:.3g}: gap {row['gap']:.3g} "
                         f"{_format_interval(row['gap_ci'], '.3g')}")
    for warning in fit["warnings"]:
        lines.append("warning: " + warning)
    return "\n".join(lines)
