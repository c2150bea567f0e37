"""The forking-paths figures, drawn from a Trajectory and its metric results (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

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


def _density_image(ax, steps: np.ndarray, hist: np.ndarray, edges: np.ndarray):
    """log10 of the fraction of values per bin, one column per checkpoint, on the log step axis."""
    steps = steps.astype(float)
    density = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore"):
        log_density = np.ma.masked_invalid(np.log10(density.T))
    cmap = plt.get_cmap("magma").copy()
    cmap.set_bad(cmap(0.0))  # empty bins read as the lowest density, not as holes
    image = ax.pcolormesh(_step_edges(steps), edges, log_density, shading="flat", cmap=cmap)
    step_axis(ax)
    return image


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Column edges halfway between steps (in symlog space the cells then tile the axis)."""
    steps = steps.astype(float)
    if len(steps) == 1:
        return np.array([max(steps[0] - 0.5, -0.5), steps[0] + 0.5])
    x_edges = np.concatenate([[steps[0] - 0.5], (steps[1:] + steps[:-1]) / 2, [steps[-1] + 0.5]])
    x_edges[0] = max(x_edges[0], -0.5)
    return x_edges


def density_heatmap(traj: Trajectory, title: str, bifurcation_step: float | None):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    image = _density_image(ax, traj.steps, traj.hist, traj.hist_edges)
    fig.colorbar(image, ax=ax, label="log10 fraction of parameters")
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


def _unit_name(units) -> str:
    return "hidden unit" if units.axis == 1 else "row"


def unit_forks(traj: Trajectory, table, title: str, onset: float | None):
    """Per-unit dip statistic over training, one row per unit, sorted by the step its fork starts."""
    units = traj.units
    order = table.assign(final=units.stats["dip"][-1]).sort_values(
        ["first_bimodal_step", "final"], ascending=[True, False], na_position="last"
    )
    forked = int(order["first_bimodal_step"].notna().sum())
    values = units.stats["dip"][:, order["unit"].to_numpy()].T
    fig, ax = plt.subplots(figsize=(8, 5))
    image = ax.pcolormesh(_step_edges(traj.steps), np.arange(units.n_units + 1), values, shading="flat",
                          cmap="viridis")  # fmt: skip
    fig.colorbar(image, ax=ax, label=f"Hartigan's dip ({units.sample_size} entries per unit)")
    step_axis(ax)
    ax.set_ylim(units.n_units, 0)
    if 0 < forked < units.n_units:
        ax.axhline(forked, color="white", linewidth=0.8, linestyle=":")
    ax.set_ylabel(f"{_unit_name(units)}s, sorted by fork step ({forked} fork)")
    _mark(ax, onset, "unit bifurcation", color="red")
    ax.set_title(f"Forks per unit of {traj.tensor}\n{title}")
    if onset is not None:
        ax.legend(loc="lower left", fontsize=8)
    return fig


def bimodal_fraction(traj: Trajectory, result: MetricResult, threshold: float, fdr: float, title: str):
    onset = result.summary.get("unit_bifurcation_step")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fraction = result.per_step["bimodal_unit_fraction"]
    ax.plot(traj.steps, fraction, "o-", markersize=3, label=f"bimodal units (dip test, BH q = {fdr:g})")
    ax.axhline(threshold, color="grey", linestyle=":", label=f"threshold {threshold:g}")
    step_axis(ax)
    ax.set_ylim(-0.02, 1.02)
    _mark(ax, onset, "unit bifurcation")
    ax.set_ylabel(f"fraction of {traj.units.n_units} {_unit_name(traj.units)}s")
    ax.set_title(f"Share of units whose distribution forks\n{title}")
    ax.legend(fontsize=8)
    return fig


def unit_trajectories(traj: Trajectory, table, title: str):
    """The featured unit's sampled entries over training, coloured by the group they end in."""
    units = traj.units
    row = table.iloc[units.featured]
    cut = float(units.final_split["cut"].iloc[units.featured])
    final = units.featured_values[-1]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    low = final <= cut
    # The larger group first, so the branch that leaves it is drawn on top.
    order = ((True, "tab:blue"), (False, "tab:orange"))
    for in_low, color in order if low.sum() >= (~low).sum() else order[::-1]:
        chosen = low == in_low
        if chosen.any():
            mean = row["group_low_mean" if in_low else "group_high_mean"]
            label = (
                f"{'lower' if in_low else 'upper'} group at the end ({chosen.sum()} shown, mean {mean:.3g})"
            )
            lines = ax.plot(
                traj.steps, units.featured_values[:, chosen], color=color, linewidth=0.6, alpha=0.6
            )
            lines[0].set_label(label)
    step_axis(ax)
    fork = row["first_bimodal_step"]
    _mark(ax, None if pd.isna(fork) else float(fork), "unit fork")
    ax.set_ylabel("parameter value")
    ax.set_title(f"{_unit_name(units).capitalize()} {units.featured} of {traj.tensor} (largest final dip): "
                 f"{units.featured_values.shape[1]} sampled weights\n{title}")  # fmt: skip
    ax.legend(loc="upper left", fontsize=8)
    return fig


def unit_density(traj: Trajectory, title: str):
    units = traj.units
    fig, ax = plt.subplots(figsize=(8, 4.5))
    image = _density_image(ax, traj.steps, units.featured_hist, units.featured_edges)
    fig.colorbar(image, ax=ax, label="log10 fraction of the unit's weights")
    ax.axhline(float(units.final_split["cut"].iloc[units.featured]), color="cyan", linewidth=0.8,
               linestyle=":", label="final two-group cut")  # fmt: skip
    ax.set_ylabel("parameter value")
    ax.set_title(f"Density of {_unit_name(units)} {units.featured} of {traj.tensor} ({units.length} weights)"
                 f"\n{title}")  # fmt: skip
    ax.legend(loc="upper left", fontsize=8)
    return fig


def draw_all(
    traj: Trajectory,
    results: dict[str, MetricResult],
    title: str,
    threshold: float,
    folder: Path,
    unit_threshold: float = 0.1,
    unit_fdr: float = 0.05,
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
    per_unit = results.get("unit_bimodality")
    if traj.units is not None and per_unit is not None:
        table = per_unit.tables["units"]
        unit_onset = per_unit.summary.get("unit_bifurcation_step")
        figures["unit_forks.png"] = unit_forks(traj, table, title, unit_onset)
        figures["bimodal_fraction.png"] = bimodal_fraction(traj, per_unit, unit_threshold, unit_fdr, title)
        figures["unit_trajectories.png"] = unit_trajectories(traj, table, title)
        figures["unit_density.png"] = unit_density(traj, title)
    return save_figures(figures, folder)


def draw_evaluation(
    table,
    layers,
    n_layers: int,
    threshold: float,
    bifurcation_step: float | None,
    title: str,
    folder: Path,
    unit_bifurcation_step: float | None = None,
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
        _mark(ax, bifurcation_step, "pooled bifurcation")
        _mark(ax, unit_bifurcation_step, "unit bifurcation", color="darkorange")
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
