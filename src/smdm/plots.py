"""PNG figures of a scaling sweep: IsoFLOP curves and compute-optimal laws against compute."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or opened

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import LogFormatterSciNotation, NullFormatter, ScalarFormatter

KIND_LABELS = {"arm": "ARM", "mdm": "MDM"}
KIND_COLORS = {"arm": "tab:blue", "mdm": "tab:red"}
ISOFLOP_FILE = "isoflop.png"
LAWS_FILE = "scaling_laws.png"


def plot_isoflop(rows: list[dict], fit: dict, path: str | Path) -> Path:
    """Draw validation loss against N for each budget (one panel per kind), with the parabolas and optima."""
    kinds = [kind for kind in ("arm", "mdm") if kind in fit["kinds"]]
    budgets = sorted({float(r["budget"]) for r in rows})
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(1, len(budgets))))
    figure, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        for color, budget in zip(colors, budgets):
            points = sorted((r for r in rows if r["kind"] == kind and float(r["budget"]) == budget),
                            key=lambda r: r["n_non_embedding"])
            if not points:
                continue
            n = np.array([p["n_non_embedding"] for p in points], dtype=np.float64)
            loss = np.array([p["val_loss"] for p in points])
            axis.scatter(n, loss, color=color, s=18, label=f"C = {budget:.3g}")
            optimum = next((b for b in fit["kinds"][kind]["budgets"] if b["budget"] == budget), None)
            if optimum and optimum["coefficients"]:
                x = np.linspace(np.log10(n.min()) - 0.15, np.log10(n.max()) + 0.15, 100)
                axis.plot(10**x, np.polyval(optimum["coefficients"], x), color=color, linewidth=1)
            if optimum:
                if optimum["bracketed"]:
                    axis.scatter([optimum["n_opt"]], [optimum["loss_opt"]], color=color, marker="*", s=110,
                                 edgecolors="black", linewidths=0.5, zorder=3)
                else:
                    axis.scatter([optimum["n_opt"]], [optimum["loss_opt"]], color="black", marker="x", s=60, zorder=3)
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("non-embedding parameters N")
        axis.set_ylabel("validation loss (nats/token)" + (", NELBO bound" if kind == "mdm" else ""))
        axis.set_title(f"{KIND_LABELS[kind]} IsoFLOP curves (star: parabola vertex; x: lowest point, not bracketed)",
                       fontsize=9)
        axis.legend(fontsize=7)
        axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_laws(fit: dict, path: str | Path) -> Path:
    """Draw L*, N* and D* against compute for both kinds, with their fitted power laws."""
    panels = (("loss_opt", "loss", "optimal loss L*"), ("n_opt", "params", "optimal N*"),
              ("d_opt", "tokens", "optimal tokens D*"))
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, (key, law_name, label) in zip(axes, panels):
        for kind, data in fit["kinds"].items():
            budgets = np.array([b["budget"] for b in data["budgets"]])
            values = np.array([b[key] for b in data["budgets"]])
            color = KIND_COLORS.get(kind, "black")
            bracketed = np.array([b["bracketed"] for b in data["budgets"]], dtype=bool)
            axis.scatter(budgets[bracketed], values[bracketed], color=color, s=26)
            # Hollow markers: the budget's minimum was not bracketed, so the point is its lowest observed run.
            axis.scatter(budgets[~bracketed], values[~bracketed], facecolors="none", edgecolors=color, s=26)
            law = data["laws"][law_name]
            if law["exponent"] is not None:
                c = np.logspace(np.log10(budgets.min()) - 0.2, np.log10(budgets.max()) + 0.2, 50)
                axis.plot(c, law["coefficient"] * c ** law["exponent"], color=color,
                          label=f"{KIND_LABELS.get(kind, kind)}: {label.split()[-1]} ~ C^{law['exponent']:.3f}")
            else:
                axis.plot([], [], color=color, label=KIND_LABELS.get(kind, kind))
        axis.set_xscale("log")
        axis.set_yscale("log")
        # Tick the sweep's budgets themselves; the axis spans only a decade or two.
        all_budgets = sorted({b["budget"] for data in fit["kinds"].values() for b in data["budgets"]})
        axis.set_xticks(all_budgets, [f"{b:.3g}" for b in all_budgets])
        axis.xaxis.set_minor_formatter(NullFormatter())
        # Label some minor ticks of N* and D*, which span less than a decade per kind.
        if key == "loss_opt":
            axis.yaxis.set_major_formatter(ScalarFormatter())
            axis.yaxis.set_minor_formatter(ScalarFormatter())
        else:
            axis.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
        axis.set_xlabel("compute C = 6 N D (FLOPs); hollow: not bracketed")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    if "gap" in fit:
        gap = fit["gap"]
        interval = f" [{gap['gap_ci'][0]:.2g}, {gap['gap_ci'][1]:.2g}]" if gap.get("gap_ci") else ""
        axes[0].set_title(f"compute gap (shared exponent): {gap['gap']:.3g}x{interval}", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_sweep(rows: list[dict], fit: dict, out_dir: str | Path) -> list[Path]:
    """Write the IsoFLOP and scaling-law figures into out_dir and return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_isoflop(rows, fit, out / ISOFLOP_FILE), plot_laws(fit, out / LAWS_FILE)]
