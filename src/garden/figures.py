"""The forking-paths figures, drawn from a Trajectory and its metric results (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from garden.metrics import MetricResult
from garden.trajectory import Trajectory


def step_axis(ax) -> None:
    """Training steps on a log axis that still shows step 0 (symlog, linear below 1)."""
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=-0.5)  # no negative steps in the margin
    ax.set_xlabel("training step")


def _mark(ax, step: float | None, label: str, color: str = "crimson") -> None:
    if step is not None:
        ax.axvline(step, color=color, linestyle="--", linewidth=1.2, label=f"{label} = {step:g}")


def density_heatmap(traj: Trajectory, title: str, bifurcation_step: float | None):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = traj.steps.astype(float)
    density = traj.hist / np.maximum(traj.hist.sum(axis=1, keepdims=True), 1)
    # Column edges halfway between steps (in symlog space the cells then tile the axis).
    x_edges = np.concatenate([[steps[0] - 0.5], (steps[1:] + steps[:-1]) / 2, [steps[-1] + 0.5]])
    x_edges[0] = max(x_edges[0], -0.5)
    with np.errstate(divide="ignore"):
        log_density = np.ma.masked_invalid(np.log10(density.T))
    cmap = plt.get_cmap("magma").copy()
    cmap.set_bad(cmap(0.0))  # empty bins read as the lowest density, not as holes
    image = ax.pcolormesh(x_edges, traj.hist_edges, log_density, shading="flat", cmap=cmap)
    fig.colorbar(image, ax=ax, label="log10 fraction of parameters")
    step_axis(ax)
    ax.set_ylabel("parameter value")
    _mark(ax, bifurcation_step, "bifurcation", color="cyan")
    ax.set_title(f"Density of {traj.tensor} over training\n{title}")
    if bifurcation_step is not None:
        ax.legend(loc="upper left")
    return fig


def forking_trajectories(traj: Trajectory, title: str, bifurcation_step: float | None):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(traj.steps, traj.trajectories, linewidth=0.5, alpha=0.5)
    step_axis(ax)
    ax.set_ylabel("parameter value")
    _mark(ax, bifurcation_step, "bifurcation")
    ax.set_title(f"Trajectories of {traj.trajectories.shape[1]} sampled parameters\n{title}")
    if bifurcation_step is not None:
        ax.legend(loc="upper left")
    return fig


def msd_loglog(traj: Trajectory, title: str, alpha: MetricResult | None):
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    steps, msd = traj.steps.astype(float), traj.column("msd")
    keep = (steps > 0) & (msd > 0)
    ax.loglog(steps[keep], msd[keep], "o-", markersize=3, label="MSD from reference")
    if alpha is not None and "alpha" in alpha.summary:
        slope, intercept = alpha.summary["alpha"], alpha.summary["alpha_log_intercept"]
        fit_x = steps[keep]
        ax.loglog(
            fit_x,
            np.exp(intercept) * fit_x**slope,
            "--",
            color="crimson",
            label=f"fit: alpha = {slope:.3f} (r² = {alpha.summary['alpha_r2']:.3f})",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("mean square displacement")
    ax.set_title(f"MSD of {traj.tensor}\n{title}")
    ax.legend()
    return fig


def bimodality_vs_step(
    traj: Trajectory,
    title: str,
    results: dict[str, MetricResult],
    threshold: float,
    bifurcation_step: float | None,
):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if "bimodality_coefficient" in results:
        ax.plot(
            traj.steps,
            results["bimodality_coefficient"].per_step["bimodality_coefficient"],
            "o-",
            markersize=3,
            label="Sarle's bimodality coefficient",
        )
        ax.axhline(threshold, color="grey", linestyle=":", label=f"threshold {threshold:.3f}")
    if "dip" in results:
        ax.plot(
            traj.steps,
            results["dip"].per_step["dip"] * 10,
            "s-",
            markersize=2,
            alpha=0.7,
            label="Hartigan's dip x 10",
        )
    if "gmm" in results:
        ax.plot(
            traj.steps,
            results["gmm"].per_step["ashman_d"] / 4,
            "^-",
            markersize=2,
            alpha=0.7,
            label="Ashman's D / 4",
        )
    step_axis(ax)
    _mark(ax, bifurcation_step, "bifurcation onset")
    ax.set_ylabel("bimodality")
    ax.set_title(f"Bimodality of {traj.tensor}\n{title}")
    ax.legend(fontsize=8)
    return fig


def draw_all(
    traj: Trajectory, results: dict[str, MetricResult], title: str, threshold: float, folder: Path
) -> list[Path]:
    """Draw every figure the results allow into `folder`; returns the written paths."""
    folder.mkdir(parents=True, exist_ok=True)
    bifurcation = results.get("bifurcation")
    onset = bifurcation.summary.get("bifurcation_step") if bifurcation else None
    figures = {
        "density.png": density_heatmap(traj, title, onset),
        "forking_trajectories.png": forking_trajectories(traj, title, onset),
        "msd_loglog.png": msd_loglog(traj, title, results.get("alpha")),
        "bimodality.png": bimodality_vs_step(traj, title, results, threshold, onset),
    }
    return save_figures(figures, folder)


def draw_evaluation(
    table, layers, n_layers: int, threshold: float, bifurcation_step: float | None, title: str, folder: Path
) -> list[Path]:
    """Perplexity vs step with the bifurcation; CKA percentiles over layers; PER per layer; convergence
    step vs PER. Only the figures the evaluated stages allow."""
    folder.mkdir(parents=True, exist_ok=True)
    steps = table["step"].to_numpy(dtype=float)
    figures = {}
    if "perplexity" in table or "lambada_perplexity" in table:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for column, label in (("perplexity", "held-out tokens"), ("lambada_perplexity", "LAMBADA last word")):
            if column in table:
                ax.plot(steps, table[column], "o-", markersize=3, label=label)
        ax.set_yscale("log")
        step_axis(ax)
        _mark(ax, bifurcation_step, "bifurcation")
        ax.set_ylabel("perplexity")
        ax.set_title(f"Perplexity over training\n{title}")
        ax.legend()
        figures["perplexity.png"] = fig
    if layers is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for kind, color in (("attn", "tab:blue"), ("mlp", "tab:orange")):
            values = np.stack([table[f"cka_{kind}.{i}"].to_numpy(dtype=float) for i in range(n_layers)])
            q = np.percentile(values, [10, 25, 50, 75, 90], axis=0)
            ax.fill_between(steps, q[0], q[4], color=color, alpha=0.15)
            ax.fill_between(steps, q[1], q[3], color=color, alpha=0.3)
            ax.plot(steps, q[2], "o-", color=color, markersize=3, label=f"{kind}: median (25-75, 10-90%)")
        ax.axhline(threshold, color="grey", linestyle=":", label=f"threshold {threshold:g}")
        step_axis(ax)
        ax.set_ylabel("linear CKA with the final checkpoint")
        ax.set_title(f"CKA convergence over layers\n{title}")
        ax.legend(fontsize=8)
        figures["cka_percentiles.png"] = fig

        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(layers["layer"], layers["per_mlp"], "o-", label="MLP output weight")
        ax.plot(layers["layer"], layers["per_ov"], "s-", label="OV circuits (mean over heads)")
        ax.set_xlabel("layer")
        ax.set_ylabel("proportional effective rank (final step)")
        ax.set_title(f"PER per layer\n{title}")
        ax.legend()
        figures["per_by_layer.png"] = fig

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for kind, per_col, marker in (("attn", "per_ov", "s"), ("mlp", "per_mlp", "o")):
            ax.scatter(layers[per_col], layers[f"convergence_{kind}"], marker=marker, label=kind)
        ax.set_xlabel("proportional effective rank")
        ax.set_ylabel("CKA convergence step")
        ax.set_title(f"Convergence step vs PER\n{title}")
        ax.legend()
        figures["convergence_vs_per.png"] = fig
    return save_figures(figures, folder)


def save_figures(figures: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        paths.append(folder / name)
    return paths
