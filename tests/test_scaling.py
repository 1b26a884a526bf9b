"""Scaling sweeps: planning arithmetic, law fitting on synthetic data, and a tiny end-to-end sweep."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from conftest import shared_path

from smdm.cli import main
from smdm.config import ModelConfig
from smdm.scaling import (
    fit_isoflop,
    fit_results,
    format_fit,
    load_recipe,
    pick_sizes,
    plan_runs,
    plan_sweep,
    read_results,
    read_sweep,
    write_sweep,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# Planning.
def test_plan_steps_and_tokens_by_hand():
    # tiny-16K: 1 layer, width 32, MLP 128: 4*32^2 + 3*32*128 + 2*32 per layer, plus the final norm.
    n = 4 * 32 * 32 + 3 * 32 * 128 + 2 * 32 + 32
    assert n == 16480
    train = {"seq_len": 32, "global_batch": 4, "ssl_ratio": 0.01}
    runs = plan_runs([6e8], ["tiny-16K"], train, kinds=("arm", "mdm"), sizes_per_budget=1)
    by_kind = {run["kind"]: run for run in runs}

    # D = C / (6 N) = 6e8 / 98880 = 6067.96 tokens.
    # ARM: 4 x 32 = 128 tokens per step, so round(47.41) = 47 steps and 6016 tokens.
    assert by_kind["arm"]["n_non_embedding"] == 16480
    assert by_kind["arm"]["steps"] == 47
    assert by_kind["arm"]["tokens"] == 6016
    # MDM: 1% of steps are cut to a uniform length in 1..32 (mean 16.5), so a step holds
    # 4 x (0.99 x 32 + 0.01 x 16.5) = 127.38 tokens on average: round(47.64) = 48 steps.
    assert by_kind["mdm"]["steps"] == 48
    assert by_kind["mdm"]["tokens"] == round(48 * 127.38)
    assert by_kind["mdm"]["id"] == "mdm-C6e+08-tiny-16K"


def test_plan_centres_sizes_on_expected_optimum():
    ladder = ["tiny-4K", "tiny-8K", "tiny-16K", "tiny-33K", "tiny-66K", "tiny-0.1M", "tiny-262K"]
    # With 20 tokens per parameter, N* = sqrt(C / 120); put N* on tiny-33K (32,928 parameters).
    budget = 120 * 32928**2
    assert pick_sizes(ladder, budget, 3, 20.0) == ["tiny-16K", "tiny-33K", "tiny-66K"]
    assert pick_sizes(ladder, budget, 5, 20.0) == ["tiny-8K", "tiny-16K", "tiny-33K", "tiny-66K", "tiny-0.1M"]
    # An optimum below the ladder clamps to its smallest sizes.
    assert pick_sizes(ladder, 1e3, 3, 20.0) == ["tiny-4K", "tiny-8K", "tiny-16K"]


def test_plan_drops_runs_below_min_steps():
    train = {"seq_len": 32, "global_batch": 4, "ssl_ratio": 0.0}
    runs = plan_runs([6e8], ["tiny-16K", "tiny-0.1M"], train, kinds=("arm",), sizes_per_budget=2, min_steps=20)
    # tiny-0.1M (131,392 parameters) gets 6e8 / (6 * 131392) / 128 = 5.9 steps, under 20.
    assert [run["model"] for run in runs] == ["tiny-16K"]


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown model sizes"):
        plan_runs([1e9], ["tiny-99K"], {})
    with pytest.raises(ValueError, match="positive"):
        plan_runs([-1.0], ["tiny-16K"], {})
    with pytest.raises(ValueError, match="set per run"):
        plan_sweep(load_recipe("tiny"), train={"max_steps": 10})


def test_sweep_file_round_trip(tmp_path):
    sweep = plan_sweep(load_recipe("tiny"), budgets=[1e11], sizes_per_budget=3)
    path = write_sweep(sweep, tmp_path / "sweep.yaml")
    loaded = read_sweep(path)
    assert loaded == sweep
    assert path.read_text().startswith("# IsoFLOP sweep")

    # A duplicated run id is an editing mistake the reader reports.
    broken = dict(sweep, runs=sweep["runs"] + sweep["runs"][:1])
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(ValueError, match="more than once"):
        read_sweep(tmp_path / "broken.yaml")


def test_paper_recipe_uses_paper_settings():
    sweep = plan_sweep(load_recipe("paper"), budgets=[1e19])
    assert sweep["train"]["global_batch"] == 256
    assert sweep["train"]["seq_len"] == 2048
    assert sweep["train"]["lr"] == 2e-4
    arm_runs = [r for r in sweep["runs"] if r["kind"] == "arm"]
    assert len(arm_runs) == 7
    # N* = sqrt(1e19 / 120) = 289M lies between the first and the last size of the budget.
    assert arm_runs[0]["n_non_embedding"] < 289e6 < arm_runs[-1]["n_non_embedding"]
    for run in arm_runs:
        n = ModelConfig.from_name(run["model"]).n_non_embedding
        assert run["steps"] == round(1e19 / (6 * n) / (256 * 2048))


# Fitting.
def test_isoflop_vertex_and_bracketing():
    n = [1e5, 1e6, 1e7]
    exact = fit_isoflop(n, [3.0 + 0.1 * (x - 6.2) ** 2 for x in (5, 6, 7)])
    assert exact["bracketed"]
    assert exact["x_opt"] == pytest.approx(6.2)
    assert exact["loss_opt"] == pytest.approx(3.0)

    outside = fit_isoflop(n, [3.0 + 0.1 * (x - 8.0) ** 2 for x in (5, 6, 7)])
    assert not outside["bracketed"]
    assert outside["x_opt"] == pytest.approx(7.0)  # the lowest observed point
    concave = fit_isoflop(n, [3.0, 3.5, 3.2])
    assert not concave["convex"]
    assert not concave["bracketed"]
    assert concave["loss_opt"] == 3.0


def synthetic_rows(seed: int, noise: float) -> tuple[list[dict], dict]:
    """IsoFLOP results from a known law: L(N; C) = L*(C) + k (log10 N - log10 N*(C))^2 plus Gaussian noise.

    ARM: L* = 40 C^-0.06, N* = 0.1 C^0.5. MDM: the ARM's law at C / 16 (a constant compute gap of 16)
    and N* = 0.05 C^0.52.
    """
    rng = np.random.default_rng(seed)
    truth = {"alpha": -0.06, "gap": 16.0, "a_arm": 0.5, "a_mdm": 0.52}
    laws = {
        "arm": (lambda c: 40 * c**-0.06, lambda c: 0.1 * c**0.5),
        "mdm": (lambda c: 40 * (c / 16) ** -0.06, lambda c: 0.05 * c**0.52),
    }
    rows = []
    for kind, (loss_law, params_law) in laws.items():
        for budget in (1e17, 1e18, 1e19, 1e20, 1e21):
            centre = math.log10(params_law(budget))
            for offset in np.linspace(-0.6, 0.6, 7):
                loss = loss_law(budget) + 0.08 * offset**2 + rng.normal(0, noise)
                rows.append({"kind": kind, "budget": budget, "n_non_embedding": 10 ** (centre + offset),
                             "model": f"n{offset:+.1f}", "val_loss": float(loss)})
    return rows, truth


def test_fit_recovers_known_law():
    rows, truth = synthetic_rows(seed=1, noise=0.002)
    fit = fit_results(rows, bootstrap=200, seed=0)

    arm, mdm = fit["kinds"]["arm"], fit["kinds"]["mdm"]
    assert all(b["bracketed"] for b in arm["budgets"] + mdm["budgets"])
    assert arm["laws"]["loss"]["exponent"] == pytest.approx(truth["alpha"], abs=0.003)
    assert mdm["laws"]["loss"]["exponent"] == pytest.approx(truth["alpha"], abs=0.003)
    assert arm["laws"]["params"]["exponent"] == pytest.approx(truth["a_arm"], abs=0.03)
    assert mdm["laws"]["params"]["exponent"] == pytest.approx(truth["a_mdm"], abs=0.03)
    # D* = C / (6 N*), so its exponent is 1 - a.
    assert arm["laws"]["tokens"]["exponent"] == pytest.approx(1 - truth["a_arm"], abs=0.03)
    # Optimal loss at C = 1e19 against the law's 40 * 1e19^-0.06.
    optimum = next(b for b in arm["budgets"] if b["budget"] == 1e19)
    assert optimum["loss_opt"] == pytest.approx(40 * 1e19**-0.06, abs=0.005)
    assert optimum["n_opt"] == pytest.approx(0.1 * 1e19**0.5, rel=0.15)

    gap = fit["gap"]
    assert gap["shared_exponent"] == pytest.approx(truth["alpha"], abs=0.003)
    assert gap["gap"] == pytest.approx(truth["gap"], rel=0.2)
    low, high = gap["gap_ci"]
    assert low < truth["gap"] < high
    assert high / low < 3  # the interval is informative, not the whole axis
    for row in gap["by_budget"]:
        assert row["gap"] == pytest.approx(truth["gap"], rel=0.3)


def test_fit_intervals_widen_with_noise():
    quiet = fit_results(synthetic_rows(seed=2, noise=0.001)[0], bootstrap=200, seed=0)
    noisy = fit_results(synthetic_rows(seed=2, noise=0.01)[0], bootstrap=200, seed=0)

    def width(fit):
        low, high = fit["kinds"]["arm"]["laws"]["loss"]["exponent_ci"]
        return high - low

    assert width(noisy) > 3 * width(quiet)


def test_fit_reports_unbracketed_budget():
    rows, _ = synthetic_rows(seed=3, noise=0.0)
    # Keep only the three smallest sizes of one ARM budget, so its minimum lies beyond them.
    budget = 1e19
    arm_rows = [r for r in rows if r["kind"] == "arm" and r["budget"] == budget]
    arm_rows.sort(key=lambda r: r["n_non_embedding"])
    dropped = {id(r) for r in arm_rows[3:]}
    fit = fit_results([r for r in rows if id(r) not in dropped], bootstrap=0)
    optimum = next(b for b in fit["kinds"]["arm"]["budgets"] if b["budget"] == budget)
    assert not optimum["bracketed"]
    assert optimum["n_opt"] == pytest.approx(arm_rows[2]["n_non_embedding"])
    assert any("ARM at C=1e+19" in w and "not bracketed" in w for w in fit["warnings"])
    assert "NO" in format_fit(fit)


# End to end.
@pytest.fixture(scope="module")
def prepared_data(tmp_path_factory):
    from smdm.data.shards import prepare

    text = shared_path("tinyshakespeare/input.txt").read_text(encoding="utf-8")[:200_000]
    folder = tmp_path_factory.mktemp("scaling")
    corpus = folder / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    prepare(corpus, folder / "data", vocab_size=300)
    return folder / "data"


def test_tiny_sweep_end_to_end(tmp_path, prepared_data):
    sweep_file = tmp_path / "sweep.yaml"
    budgets = ["1e9", "3e9"]
    assert main(["sweep", "plan", "--recipe", "tiny", "--out", str(sweep_file), "--budgets", *budgets,
                 "--sizes", "tiny-0.1M", "tiny-0.4M", "--sizes-per-budget", "2", "--min-steps", "1",
                 "--seq-len", "32", "--global-batch", "4", "--checkpoint-interval", "10",
                 "--mc-samples", "2", "--eval-sequences", "8"]) == 0
    sweep = read_sweep(sweep_file)
    assert len(sweep["runs"]) == 8
    run_command = ["sweep", "run", "--sweep", str(sweep_file), "--data", str(prepared_data),
                   "--device", "cpu", "--threads", "1"]
    # 3e9 FLOPs on tiny-0.1M (131,392 parameters): 3e9 / 788352 = 3805 tokens = round(29.7) ARM steps of 128 tokens.
    longest = next(r for r in sweep["runs"] if r["id"] == "arm-C3e+09-tiny-0.1M")
    assert longest["steps"] == 30

    assert main(run_command) == 0
    results_file = tmp_path / "results.jsonl"
    rows = read_results(results_file)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in sweep["runs"])
    for row in rows:
        assert math.isfinite(row["val_loss"])
        assert 0 < row["val_loss"] < 2 * math.log(300)
        assert row["val_bound"] == (row["kind"] == "mdm")
    assert next(r for r in rows if r["id"] == "arm-C3e+09-tiny-0.1M")["steps"] == 30

    # A second run finds nothing to do.
    assert main(run_command) == 0
    assert len(read_results(results_file)) == 8

    # An interrupted run (its last checkpoint gone, no result) resumes and reaches the same loss.
    run_dir = tmp_path / "runs" / "arm-C3e+09-tiny-0.1M"
    original = next(r for r in rows if r["id"] == "arm-C3e+09-tiny-0.1M")
    for file in (run_dir / "checkpoints" / "step-0000030").iterdir():
        file.unlink()
    (run_dir / "checkpoints" / "step-0000030").rmdir()
    (run_dir / "checkpoints" / "latest").write_text("step-0000020")
    results_file.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"] != original["id"]))
    assert main(run_command) == 0
    resumed = next(r for r in read_results(results_file) if r["id"] == original["id"])
    assert resumed["resumed_from_step"] == 20
    assert resumed["steps"] == 30
    assert resumed["val_loss"] == pytest.approx(original["val_loss"], rel=1e-6)

    assert main(["sweep", "fit", "--results", str(results_file), "--bootstrap", "20"]) == 0
    fit = json.loads((tmp_path / "fit.json").read_text())
    for kind in ("arm", "mdm"):
        budgets_fit = fit["kinds"][kind]["budgets"]
        assert [b["budget"] for b in budgets_fit] == [1e9, 3e9]
        for b in budgets_fit:
            # With two sizes the optimum is the lower of the two observed losses.
            losses = [r["val_loss"] for r in rows if r["kind"] == kind and r["budget"] == b["budget"]]
            assert b["loss_opt"] == pytest.approx(min(losses))
        assert fit["kinds"][kind]["laws"]["loss"]["exponent"] is not None
    assert "gap" in fit

    assert main(["sweep", "plot", "--results", str(results_file), "--out", str(tmp_path / "figures")]) == 0
    for name in ("isoflop.png", "scaling_laws.png"):
        data = (tmp_path / "figures" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 10_000


def test_sweep_run_rejects_missing_data(tmp_path):
    sweep_file = write_sweep(plan_sweep(load_recipe("tiny"), budgets=[1e11]), tmp_path / "sweep.yaml")
    assert main(["sweep", "run", "--sweep", str(sweep_file), "--data", str(tmp_path / "nowhere")]) == 2
    assert main(["sweep", "fit", "--results", str(tmp_path / "none.jsonl")]) == 2
