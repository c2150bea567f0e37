"""Forks in single units: where, when and in how many units a layer's distribution splits in two.

The pooled distribution mixes units of different scales, which turns forks inside units into heavy tails
(its bimodality coefficient can fall while the forks grow). A unit is one slice of the tensor (see
`extract.unit_axis`); it counts as bimodal at a step when its dip test rejects unimodality after
Benjamini-Hochberg control of the false discovery rate over all units at that step
(`scipy.stats.false_discovery_control`), so a pure diffusion of thousands of units does not fork by chance.
The unit bifurcation is the first checkpoint from which the bimodal fraction stays at or above a
threshold through the end, the same no-flicker rule as the pooled onset.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from garden.metrics.events import onset_index
from garden.metrics.registry import MetricContext, MetricResult, register_metric
from garden.trajectory import Trajectory, UnitTrajectory


def bimodal_units(pvalues: np.ndarray, fdr: float) -> np.ndarray:
    """[steps, units] booleans: the units whose dip p-value survives Benjamini-Hochberg at level `fdr`
    among all units of the same step."""
    from scipy.stats import false_discovery_control  # imported here: scipy.stats costs ~0.6 s

    pvalues = np.atleast_2d(np.asarray(pvalues, dtype=np.float64))
    return np.stack([false_discovery_control(row, method="bh") <= fdr for row in pvalues])


def unit_step_series(pvalues: np.ndarray, dips: np.ndarray, bimodality: np.ndarray,
                     fdr: float) -> tuple[dict[str, np.ndarray], np.ndarray]:  # fmt: skip
    """Per step ([steps, units] in): the bimodal-unit fraction and count, the median unit BC and dip;
    and the [steps, units] bimodal mask. The offline metric and the live monitor both report these."""
    mask = bimodal_units(pvalues, fdr)
    series = {
        "bimodal_unit_fraction": mask.mean(axis=1),
        "bimodal_units": mask.sum(axis=1).astype(float),
        "median_unit_bimodality_coefficient": np.median(bimodality, axis=1),
        "median_unit_dip": np.median(dips, axis=1),
    }
    return series, mask


def unit_table(traj: Trajectory, mask: np.ndarray) -> pd.DataFrame:
    """One row per unit: its first step of lasting bimodality (empty when none), its final statistics
    and its two groups at the final step."""
    units: UnitTrajectory = traj.units
    steps = traj.steps
    onsets = [onset_index(mask[:, u]) for u in range(units.n_units)]
    final = {name: values[-1] for name, values in units.stats.items()}
    table = pd.DataFrame({
        "unit": np.arange(units.n_units),
        "first_bimodal_step": pd.array([None if i is None else int(steps[i]) for i in onsets], dtype="Int64"),
        "bimodal_at_end": mask[-1],
        "final_dip": final["dip"],
        "final_dip_pvalue": final["dip_pvalue"],
        "final_bimodality_coefficient": units.bimodality_coefficient[-1],
        "final_msd": final["msd"],
        "final_mean": final["mean"],
        "final_std": final["std"],
    })  # fmt: skip
    split = units.final_split
    table["group_cut"] = split["cut"].to_numpy()
    for side in ("low", "high"):
        table[f"group_{side}_size"] = split[f"{side}_count"].to_numpy().round().astype(np.int64)
        table[f"group_{side}_mean"] = split[f"{side}_mean"].to_numpy()
    return table


@register_metric("unit_bimodality", "units")
def unit_bimodality(traj: Trajectory, ctx: MetricContext) -> MetricResult:
    units = traj.units
    if units is None:
        return MetricResult(tags={"garden.unit_bifurcation": "off", "garden.units": _why_off(traj)})
    fdr = ctx.settings.unit_fdr
    threshold = ctx.settings.unit_fraction_threshold
    per_step, mask = unit_step_series(units.stats["dip_pvalue"], units.stats["dip"],
                                      units.bimodality_coefficient, fdr)  # fmt: skip
    fraction = per_step["bimodal_unit_fraction"]
    index = onset_index(fraction >= threshold)
    kind = "columns" if units.axis == 1 else "rows"
    result = MetricResult(
        per_step=per_step,
        summary={
            "final_bimodal_unit_fraction": float(fraction[-1]),
            "max_bimodal_unit_fraction": float(fraction.max()),
            "n_units": float(units.n_units),
        },
        tags={
            "garden.unit_bifurcation": "none" if index is None else "detected",
            "garden.units": f"axis {units.axis} ({kind}): {units.n_units} units of {units.length} entries, "
            f"dip on {units.sample_size} each",
        },
        tables={"units": unit_table(traj, mask)},
    )
    if index is not None:
        result.summary["unit_bifurcation_step"] = float(traj.steps[index])
    return result


def _why_off(traj: Trajectory) -> str:
    if len(traj.shape) != 2:
        return f"off: {traj.tensor} is {len(traj.shape)}-D (units are slices of a 2-D tensor)"
    return "off: extract.unit_axis=null, extract.subsample set, or units of fewer than 4 entries"
