"""The forking-paths figures, drawn from a Trajectory and its metric results (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from garden.metrics import MetricResult
from garden.settings import MetricSettings
from garden.trajectory import Trajectory


def step_axis(ax) -> None:
    """Training steps on a log axis that still shows step 0 (symlog, linear below 1)."""
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=-0.5)  # no negative steps in the margin
    ax.set_xlabel("training step")


def _mark(ax, step: float | None, label: str, color: str = "crimson") -> None:
    if step is not None:
        ax.axvline(step, color=color, linestyle="--", linewidth=1.2, label=f"{label} = {step:g}")


def bin_fractions(hist: np.ndarray) -> np.ndarray:
    """Each step's histogram (a row) as the fraction of parameters per bin: the density figure and table."""
    return hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)


def _density_image(ax, steps: np.ndarray, hist: np.ndarray, edges: np.ndarray):
    """log10 of the fraction of values per bin, one column per checkpoint, on the log step axis."""
    steps = steps.astype(float)
    density = bin_fractions(hist)
    with np.errstate(divide="ignore"):
        log_density = np.ma.masked_invalid(np.log10(density.T))
    magma = plt.get_cmap("magma")
    cmap = magma.with_extremes(bad=magma(0.0))  # empty bins read as the lowest density, not as holes
    # Rasterized: in the SVG/PDF copy the mesh is one image, not a path per cell.
    image = ax.pcolormesh(_step_edges(steps), edges, log_density, shading="flat", cmap=cmap, rasterized=True)
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


def summary_value(results: dict[str, MetricResult], metric: str, key: str) -> float | None:
    """A metric's summary value, None when the metric did not run or did not find it."""
    result = results.get(metric)
    return result.summary.get(key) if result is not None else None


def two_group_cut(values: np.ndarray) -> float:
    """The cut that splits 1-D values into the two groups of least within-group variance (exact
    two-means: every split of the sorted values is tried via prefix sums)."""
    ordered = np.sort(np.asarray(values, dtype=float))
    n = len(ordered)
    if n < 2 or ordered[0] == ordered[-1]:
        return float(ordered[-1]) if n else 0.0
    total, squares = np.cumsum(ordered), np.cumsum(ordered**2)
    left = np.arange(1, n)
    sse_left = squares[:-1] - total[:-1] ** 2 / left
    sse_right = (squares[-1] - squares[:-1]) - (total[-1] - total[:-1]) ** 2 / (n - left)
    k = int(np.argmin(sse_left + sse_right))
    return float((ordered[k] + ordered[k + 1]) / 2)


def trajectory_branches(traj: Trajectory, forked: bool = True) -> pd.DataFrame:
    """Each sampled parameter's final value and the branch it ends in (lower/upper of `two_group_cut`
    of the final values): what the forking-paths figure colours by, exported beside it. Without a fork
    (`forked=False`: the pooled bifurcation was looked for and not found) every parameter is in the one
    bundle: a two-means cut through a unimodal distribution would draw branches the statistics reject."""
    final = traj.trajectories[-1].astype(float)
    cut = two_group_cut(final)
    branch = np.where(final <= cut, "lower", "upper") if forked else np.full(len(final), "none")
    return pd.DataFrame({"index": traj.trajectory_indices, "final_value": final, "branch": branch,
                         "cut": cut if forked else np.nan})  # fmt: skip


BRANCH_COLOURS = {"lower": "tab:blue", "upper": "tab:orange", "none": "tab:gray"}


def _draw_groups(ax, steps: np.ndarray, paths: np.ndarray, groups: np.ndarray,
                 label: Callable[[str, np.ndarray], str], linewidth: float,
                 alpha: float) -> None:  # fmt: skip
    """Each column of `paths` in its group's colour (`BRANCH_COLOURS`), drawn in index order, the groups
    interleaved, so that no group's colour hides another's; the first line of each group carries
    `label(group, the group's mask)`."""
    labelled: set[str] = set()
    for column, group in enumerate(groups):
        line = ax.plot(steps, paths[:, column], color=BRANCH_COLOURS[group], linewidth=linewidth,
                       alpha=alpha)[0]  # fmt: skip
        if group not in labelled:
            labelled.add(group)
            line.set_label(label(group, groups == group))


def forking_trajectories(traj: Trajectory, title: str, bifurcation_step: float | None):
    """The sampled parameters' paths, each coloured by the branch it ends in where the tensor forks (the
    fork reads as two colours leaving one bundle), one colour where it does not. The paths are drawn in
    the order of their index, the branches interleaved, so that neither colour hides the other."""
    forked = bifurcation_step is not None and np.isfinite(bifurcation_step)
    branches = trajectory_branches(traj, forked)
    fig, ax = plt.subplots(figsize=(8, 4.5))

    def label(branch: str, chosen: np.ndarray) -> str:
        what = f"{branch} branch at the end" if forked else "no pooled fork: one bundle"
        return f"{what}: {chosen.sum()} (mean {branches.loc[chosen, 'final_value'].mean():.3g})"

    _draw_groups(ax, traj.steps, traj.trajectories, branches["branch"].to_numpy(), label, 0.5, 0.45)
    step_axis(ax)
    ax.set_ylabel("parameter value")
    _mark(ax, bifurcation_step, "pooled bifurcation")
    how = "coloured by final branch" if forked else "one colour: the pooled distribution does not fork"
    count = traj.trajectories.shape[1]
    ax.set_title(f"Trajectories of {count} sampled parameters, {how}\n{title}", fontsize=10)
    _solid_legend(ax.legend(loc="upper left", fontsize=8))
    return fig


def _solid_legend(legend) -> None:
    """Legend lines drawn thick and opaque, whatever the (thin, faint) bundle of lines they stand for."""
    for handle in legend.legend_handles:
        handle.set_linewidth(2.0)
        handle.set_alpha(1.0)


def msd_loglog(traj: Trajectory, title: str, results: dict[str, MetricResult]):
    """MSD on log-log axes with the one-power-law fit and the segmented fit (a colour per regime, the
    breakpoints dotted), and below it the local slope d log MSD / d log t against each regime's alpha."""
    alpha, regimes = results.get("alpha"), results.get("msd_regimes")
    stationary_step = summary_value(results, "stationary", "stationary_step")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True, height_ratios=(2, 1))
    steps, msd = traj.steps.astype(float), traj.column("msd")
    keep = (steps > 0) & (msd > 0)
    top.loglog(steps[keep], msd[keep], "o", markersize=3, color="black", label="MSD from the reference")
    if alpha is not None and "alpha" in alpha.summary:
        slope, intercept = alpha.summary["alpha"], alpha.summary["alpha_log_intercept"]
        top.loglog(steps[keep], np.exp(intercept) * steps[keep] ** slope, "--", color="grey", linewidth=1,
                   label=f"one power law: α = {slope:.2f} (r² {alpha.summary['alpha_r2']:.2f})")  # fmt: skip
    table = regimes.tables.get("msd_regimes") if regimes is not None else None
    colors = plt.get_cmap("tab10")
    if table is not None:
        r2 = regimes.summary["msd_regimes_r2"]
        for row in table.itertuples():
            x = steps[keep][(steps[keep] >= row.first_step) & (steps[keep] <= row.last_step)]
            color = colors(row.regime % 10)
            span = f"steps {row.first_step:g}–{row.last_step:g}"
            top.loglog(x, np.exp(row.log_intercept) * x**row.alpha, "-", color=color, linewidth=2.2,
                       alpha=0.8, label=f"regime {row.regime}: α = {row.alpha:.2f} ({span})")  # fmt: skip
            bottom.hlines(row.alpha, row.first_step, row.last_step, color=color, linewidth=2.2, alpha=0.8)
            if row.regime > 1:
                for ax in (top, bottom):
                    ax.axvline(row.first_step, color=color, linestyle=":", linewidth=1)
        top.plot([], [], " ", label=f"segmented fit: r² {r2:.4f} in log space")
    if alpha is not None:
        local = alpha.per_step["msd_local_slope"]
        bottom.semilogx(steps[keep], local[keep], "o-", markersize=2.5, color="black", linewidth=0.8,
                        label="local slope d log MSD / d log t")  # fmt: skip
    for ax in (top, bottom):
        _mark(ax, stationary_step, "stationary", color="tab:green")
    bottom.axhline(1.0, color="grey", linestyle=":", linewidth=0.8)
    bottom.set_xlabel("training step (log; step 0 is the reference)")
    bottom.set_ylabel("α (local slope)")
    bottom.legend(fontsize=7, loc="upper right")
    top.set_ylabel("mean square displacement")
    top.set_title(f"MSD of {traj.tensor} and its regimes\n{title}")
    top.legend(fontsize=7, loc="lower right")
    return fig


def displacement_rate(traj: Trajectory, title: str, results: dict[str, MetricResult], threshold: float):
    """Step-to-step displacement rate D(t_k) = MSD(t_k, t_k-1) / (t_k - t_k-1), with the stationary step:
    the first from which D stays below `threshold` of its peak."""
    rate = traj.column("displacement")
    step = summary_value(results, "stationary", "stationary_step")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    defined = np.isfinite(rate) & (rate > 0)
    ax.plot(traj.steps[defined], rate[defined], "o-", markersize=3, label="displacement rate D(t)")
    if defined.any():
        peak = float(np.nanmax(rate[defined]))
        ax.axhline(threshold * peak, color="grey", linestyle=":",
                   label=f"stationary threshold: {threshold:g} × peak")  # fmt: skip
    ax.set_yscale("log")
    step_axis(ax)
    _mark(ax, step, "stationary", color="tab:green")
    ax.set_ylabel("mean squared step / training steps")
    ax.set_title(f"Displacement rate of {traj.tensor}\n{title}")
    ax.legend(fontsize=8)
    return fig


def bimodality_vs_step(traj: Trajectory, title: str, results: dict[str, MetricResult],
                       thresholds: MetricSettings, bifurcation_step: float | None, criterion: str):
    """One panel per bimodality criterion, each with its own threshold; the onset (by `criterion`) on
    all of them."""
    panels = []
    if "bimodality_coefficient" in results:
        bc = results["bimodality_coefficient"].per_step["bimodality_coefficient"]
        panels.append(("bimodality_coefficient", bc, "Sarle's BC", thresholds.bimodality_threshold,
                       "bimodal above", "linear"))  # fmt: skip
    if "dip" in results:
        panels.append(("dip", results["dip"].per_step["dip_pvalue"], "dip test p-value",
                       thresholds.dip_pvalue, "bimodal below", "log"))  # fmt: skip
    if "gmm" in results:
        panels.append(("ashman_d", results["gmm"].per_step["ashman_d"], "Ashman's D",
                       thresholds.ashman_d_threshold, "bimodal above", "linear"))  # fmt: skip
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(7.5, 1.2 + 2.0 * len(panels)), sharex=True, squeeze=False
    )
    for ax, (name, values, label, threshold, side, scale) in zip(axes[:, 0], panels, strict=True):
        shown = np.clip(values, 1e-4, None) if scale == "log" else values
        ax.plot(traj.steps, shown, "o-", markersize=2.5, label=label)
        ax.axhline(threshold, color="grey", linestyle=":", label=f"{side} {threshold:.3g}")
        ax.set_yscale(scale)
        ax.set_ylabel(label + (" (used)" if name == criterion else ""))
        if name == "ashman_d":
            _mark_scale_mixtures(ax, traj, results["gmm"].per_step, shown)
        _mark(ax, bifurcation_step, "bifurcation")
        ax.legend(fontsize=7, loc="best")
        step_axis(ax)
    for ax in axes[:-1, 0]:
        ax.set_xlabel("")
    onset = "none (never bimodal to the end)" if bifurcation_step is None else f"step {bifurcation_step:g}"
    axes[0, 0].set_title(f"Bimodality of {traj.tensor}\nonset by {criterion}: {onset}\n{title}", fontsize=10)
    return fig


#: Two Gaussian components whose means lie closer than this share of the distribution's std have one
#: mean: the fit is a scale mixture (a narrow and a wide component: heavy tails), not two modes.
SCALE_MIXTURE_SPREAD = 0.1


def _mark_scale_mixtures(ax, traj: Trajectory, fits: dict, shown: np.ndarray) -> None:
    """Mark the steps whose two-Gaussian fit put both components at one mean: Ashman's D falls to ~0
    there because the fit models heavy tails, not because two modes merged."""
    spread = np.abs(np.asarray(fits["gmm_mean_high"]) - np.asarray(fits["gmm_mean_low"]))
    one_mean = spread < SCALE_MIXTURE_SPREAD * traj.column("std")
    if one_mean.any():
        ax.plot(traj.steps[one_mean], np.asarray(shown)[one_mean], "x", color="crimson", markersize=4,
                label="fit: two widths, one mean (heavy tails, not two modes)")  # fmt: skip


def density_table(traj: Trajectory) -> pd.DataFrame:
    """The density figure's matrix in long form: the fraction of parameters per (step, bin)."""
    fraction = bin_fractions(traj.hist.astype(float))
    edges = traj.hist_edges
    bins = len(edges) - 1
    steps = len(traj.steps)
    return pd.DataFrame({"step": np.repeat(traj.steps, bins), "bin_low": np.tile(edges[:-1], steps),
                         "bin_high": np.tile(edges[1:], steps), "fraction": fraction.ravel()})  # fmt: skip


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
                          cmap="viridis", rasterized=True)  # fmt: skip
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
    """The featured unit's sampled entries over training, coloured by the group they end in where the unit
    forks, one colour where it does not; drawn in index order, the groups interleaved, so that neither
    colour hides the other."""
    units = traj.units
    row = table.iloc[units.featured]
    forked = not pd.isna(row["first_bimodal_step"])
    cut = float(units.final_split["cut"].iloc[units.featured])
    final = units.featured_values[-1]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    groups = np.where(final <= cut, "lower", "upper") if forked else np.full(len(final), "none")

    def label(group: str, chosen: np.ndarray) -> str:
        if not forked:
            return f"no fork of this unit: one bundle ({chosen.sum()} shown)"
        mean = row["group_low_mean" if group == "lower" else "group_high_mean"]
        return f"{group} group at the end ({chosen.sum()} shown, mean {mean:.3g})"

    _draw_groups(ax, traj.steps, units.featured_values, groups, label, 0.6, 0.6)
    step_axis(ax)
    fork = row["first_bimodal_step"]
    _mark(ax, None if pd.isna(fork) else float(fork), "unit fork")
    ax.set_ylabel("parameter value")
    ax.set_title(f"{_unit_name(units).capitalize()} {units.featured} of {traj.tensor} (largest final dip): "
                 f"{units.featured_values.shape[1]} sampled weights\n{title}")  # fmt: skip
    _solid_legend(ax.legend(loc="upper left", fontsize=8))
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


def draw_all(traj: Trajectory, results: dict[str, MetricResult], title: str, settings: MetricSettings,
             folder: Path) -> list[Path]:  # fmt: skip
    """Draw every figure the results allow into `folder` (`settings`: the metrics config, for the
    thresholds drawn); returns the written paths."""
    folder.mkdir(parents=True, exist_ok=True)
    onset = summary_value(results, "bifurcation", "bifurcation_step")
    criterion = settings.bifurcation_criterion
    figures = {
        "density.png": density_heatmap(traj, title, onset),
        "forking_trajectories.png": forking_trajectories(traj, title, onset),
        "msd_loglog.png": msd_loglog(traj, title, results),
        "bimodality.png": bimodality_vs_step(traj, title, results, settings, onset, criterion),
    }
    if "displacement" in results:
        threshold = settings.stationary_threshold
        figures["displacement.png"] = displacement_rate(traj, title, results, threshold)
    unit_threshold, unit_fdr = settings.unit_fraction_threshold, settings.unit_fdr
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


def draw_cooccurrence(table: pd.DataFrame, summary: dict, folder: Path) -> list[Path]:
    """Paper 003's panels over epochs (log axis keeping epoch 0): attention scores, per-class losses and
    the readout, in the paper's notation, with phase 1 shaded and its end and the attention-move epoch
    marked."""
    from garden.cooccurrence import CLASSES, SCORE_PAIRS

    epochs = table["epoch"].to_numpy(dtype=float)
    phase1_end = summary.get("phase1_end_epoch")
    moved = summary.get("attention_move_epoch")
    class_names = {"both": r"$\mu_1$ and $\mu_2$ (y = +1)", "only_1": r"only $\mu_1$ (y = −1)",
                   "only_2": r"only $\mu_2$ (y = −1)", "neither": "neither (y = +1)"}  # fmt: skip
    panels = (
        ("attention_scores.png", "attention scores", r"$\mu_i^\top W_K^\top W_Q\, \mu_j$",
         {f"score_{i}{j}": rf"$\mu_{i}^\top W_K^\top W_Q\, \mu_{j}$" for i, j in SCORE_PAIRS}, "linear"),
        ("class_losses.png", "logistic loss per class", r"loss $\ell(y\, f(X))$",
         {"loss": "all samples", **{f"loss_{c}": class_names[c] for c in CLASSES}}, "log"),
        ("readout.png", "readout per token", r"$G(\mu_k)$", {f"G_mu{k}": rf"$G(\mu_{k})$" for k in (1, 2, 3)},
         "linear"),
    )  # fmt: skip
    figures = {}
    for name, what, ylabel, columns, scale in panels:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for column, label in columns.items():
            ax.plot(epochs, table[column], label=label)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=0)
        if phase1_end is not None:
            ax.axvspan(0, phase1_end, color="tab:green", alpha=0.08)
            ax.axvline(phase1_end, color="tab:green", linestyle="--", linewidth=1.2,
                       label=f"phase 1 ends (all correct): epoch {phase1_end:g}")  # fmt: skip
        if moved is not None:
            ax.axvline(moved, color="tab:purple", linestyle="--", linewidth=1.2,
                       label=f"attention starts to move: epoch {moved:g}")  # fmt: skip
        ax.set_yscale(scale)
        ax.set_xlabel("epoch (full-batch gradient step; log axis from 0)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"Word co-occurrence (arXiv 2410.09605): {what}")
        ax.legend(fontsize=7)
        figures[name] = fig
    return save_figures(figures, folder)


#: Every figure is written as PNG (what MLflow previews) and as SVG (vector, for a paper).
FORMATS = ("png", "svg")


def save_figures(figures: dict, folder: Path) -> list[Path]:
    """Write each `<name>.png` figure as PNG at 150 dpi and as `<name>.svg`; returns the PNG paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        if fig.get_layout_engine() is None:  # a figure laid out by its own engine keeps it
            fig.tight_layout()
        stem = Path(name).stem
        for kind in FORMATS:
            fig.savefig(
                folder / f"{stem}.{kind}", dpi=150, metadata={"Date": None} if kind == "svg" else None
            )
        plt.close(fig)
        paths.append(folder / f"{stem}.png")
    return paths


def draw_early_stop(table: pd.DataFrame, folder: Path) -> list[Path]:
    """task=early_stop: one point per seed and rule, the share of training compute its stop saves against
    the held-out perplexity lost at the stop (relative to the end of training); rules that never stopped
    sit at 0 saved."""
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    markers = {"stationary": "o", "unit_bifurcation": "s", "validation_loss": "^"}
    for rule, rows in table.groupby("rule", sort=False):
        ax.scatter(100 * rows["compute_saved"], 100 * rows["perplexity_lost"], s=60, alpha=0.8,
                   marker=markers.get(str(rule), "o"), label=f"{rule} ({len(rows)} seeds)")  # fmt: skip
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("training compute saved by the stop (%)")
    ax.set_ylabel("held-out perplexity at the stop vs the end (%)")
    ax.set_title("Early stopping on the tiny series: what each rule saves and costs", fontsize=11)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return save_figures({"early_stop.png": fig}, folder)


# ------------------------------------------------------------------------------------- task=scan

#: The scan's heatmaps: per-step metric -> (file, colour bar label, normalised per tensor to its peak).
SCAN_HEATMAPS = {
    "relative_displacement": ("scan_relative_displacement", "displacement rate / its peak", False),
    "bimodal_unit_fraction": ("scan_bimodal_unit_fraction", "share of units bimodal (BH)", False),
    "msd": ("scan_msd", "MSD from the reference / its largest value", True),
}
OUTSIDE = "outside the blocks"


def scan_panels(summary: pd.DataFrame) -> dict[str, list[tuple[str, str]]]:
    """{panel: [(row label, tensor name)]}: a role's tensors by block, a glob's block tensors by pattern,
    the tensors outside the blocks (embedding, unembedding, others) in a panel of their own."""
    from garden.families import BLOCK_ROLES

    panels: dict[str, list[tuple[str, str]]] = {}
    for row in summary.itertuples(index=False):
        role, block, name = row.role, row.block, row.tensor
        has_block = block is not None and not pd.isna(block)
        if isinstance(role, str) and role in BLOCK_ROLES and has_block:
            key, label = role, str(int(block))
        elif has_block:
            key, label = name.replace(f".{int(block)}.", ".*.", 1), str(int(block))
        else:
            key, label = OUTSIDE, role if isinstance(role, str) and role else name
        panels.setdefault(key, []).append((label, name))
    return panels


def draw_scan(summary: pd.DataFrame, steps_table: pd.DataFrame, title: str, folder: Path) -> list[Path]:
    """The scan's heatmaps (blocks x checkpoints on the log step axis, a panel per role) and its fork and
    stationary maps (role x block, the event's step in each cell, none marked)."""
    panels = scan_panels(summary)
    figures = {}
    for metric, (name, label, normalise) in SCAN_HEATMAPS.items():
        chosen = steps_table[steps_table["metric"] == metric]
        if chosen.empty or not np.isfinite(chosen["value"].to_numpy(dtype=float)).any():
            continue
        grid = chosen.pivot_table(index="tensor", columns="step", values="value", aggfunc="first")
        grid = grid.loc[:, grid.notna().any(axis=0)]  # (the displacement has no value at the first step)
        if normalise:
            peak = grid.abs().max(axis=1).replace(0, np.nan)
            grid = grid.div(peak, axis=0)
        figures[f"{name}.png"] = _scan_heatmap(grid, panels, f"{title}: {metric.replace('_', ' ')}", label)
    for column, name, what in (("unit_bifurcation_step", "scan_fork_map", "unit bifurcation (fork)"),
                               ("stationary_step", "scan_stationary_map", "stationary")):  # fmt: skip
        if column in summary:
            figures[f"{name}.png"] = _event_map(summary, panels, column, f"{title}: {what} step")
    return save_figures(figures, folder)


def _scan_heatmap(grid: pd.DataFrame, panels: dict[str, list[tuple[str, str]]], title: str, label: str):
    steps = grid.columns.to_numpy(dtype=float)
    heights = [max(len(rows), 1) for rows in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9.0, 1.2 + 0.28 * sum(heights) + 0.5 * len(panels)),
                             sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights},
                             layout="constrained")  # fmt: skip
    image = None
    for ax, (panel, rows) in zip(axes[:, 0], panels.items(), strict=True):
        values = np.array([grid.loc[name].to_numpy(dtype=float) if name in grid.index
                           else np.full(len(steps), np.nan) for _, name in rows])  # fmt: skip
        image = ax.pcolormesh(_step_edges(steps), np.arange(len(rows) + 1), np.ma.masked_invalid(values),
                              shading="flat", cmap="viridis", vmin=0, vmax=1, rasterized=True)  # fmt: skip
        ax.set_yticks(np.arange(len(rows)) + 0.5, [label_ for label_, _ in rows], fontsize=7)
        ax.set_ylabel(panel if panel == OUTSIDE else f"{panel}\nblock", fontsize=8)
        step_axis(ax)
    for ax in axes[:-1, 0]:
        ax.set_xlabel("")
    axes[0, 0].set_title(title, fontsize=10)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label=label, aspect=40)
    return fig


def _event_map(summary: pd.DataFrame, panels: dict[str, list[tuple[str, str]]], column: str, title: str):
    """A role x block grid (and the tensors outside the blocks beside it), coloured by the event's step on
    a log scale; cells where the event did not happen read `none`."""
    from matplotlib.colors import SymLogNorm

    step_of = dict(zip(summary["tensor"], pd.to_numeric(summary[column], errors="coerce"), strict=True))
    block_panels = {k: v for k, v in panels.items() if k != OUTSIDE}
    outside = panels.get(OUTSIDE, [])
    blocks = sorted({int(label) for rows in block_panels.values() for label, _ in rows})
    present = [v for v in step_of.values() if np.isfinite(v)]
    low, high = (min(present), max(present)) if present else (0.0, 1.0)
    # The colours span the steps that occur (on a log scale that still holds step 0).
    norm = SymLogNorm(linthresh=1.0, vmin=low if high > low else 0.0, vmax=high if high > 0 else 1.0)
    cmap = plt.get_cmap("plasma").with_extremes(bad="#dddddd")
    widths = [max(len(blocks), 1)] + ([len(outside)] if outside else [])
    size = (2.5 + 0.55 * sum(widths), 1.6 + 0.4 * max(len(block_panels), 2))
    fig, axes = plt.subplots(1, len(widths), figsize=size, squeeze=False, layout="constrained",
                             gridspec_kw={"width_ratios": widths})  # fmt: skip
    annotate = sum(widths) <= 24
    image = None
    groups = [(axes[0, 0], list(block_panels), [str(b) for b in blocks],
               lambda panel, col: dict(block_panels[panel]).get(col))]
    if outside:
        groups.append((axes[0, 1], [OUTSIDE], [label for label, _ in outside],
                       lambda panel, col: dict(outside).get(col)))  # fmt: skip
    for ax, rows, cols, name_at in groups:
        values = np.array([[step_of.get(name_at(r, c), np.nan) if name_at(r, c) else np.nan for c in cols]
                           for r in rows], dtype=float)  # fmt: skip
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, fontsize=8, rotation=0 if ax is axes[0, 0] else 30)
        ax.set_yticks(range(len(rows)), rows if ax is axes[0, 0] else [""] * len(rows), fontsize=8)
        if annotate:
            for (i, j), value in np.ndenumerate(values):
                has = name_at(rows[i], cols[j]) is not None
                text = f"{value:g}" if np.isfinite(value) else ("none" if has else "")
                dark = np.isfinite(value) and norm(value) <= 0.5
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    axes[0, 0].set_xlabel("block")
    axes[0, 0].set_title(title, fontsize=10, loc="left")
    bar = fig.colorbar(image, ax=axes[0, :].tolist(), label="training step")
    ticks = set(np.round(np.geomspace(max(low, 1.0), max(high, 1.0), 5))) | ({0.0} if low == 0 else set())
    ticks = sorted(ticks)
    bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    return fig
