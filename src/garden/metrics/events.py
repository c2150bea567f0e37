"""Events on the step axis: the bifurcation onset and the stationary (early-stop) step.

Both are "first checkpoint from which a condition holds through the end of the series": a condition
that flickers back off does not count, so a pure diffusion is reported as no bifurcation at all.
"""

from __future__ import annotations

import numpy as np

from garden.metrics.registry import MetricContext, MetricResult, register_metric
from garden.trajectory import Trajectory


def onset_index(holds: np.ndarray) -> int | None:
    """Index of the first element from which `holds` is true through the end; None if the last is false."""
    holds = np.asarray(holds, dtype=bool)
    if len(holds) == 0 or not holds[-1]:
        return None
    false_positions = np.flatnonzero(~holds)
    return 0 if len(false_positions) == 0 else int(false_positions[-1]) + 1


def bimodal_mask(ctx: MetricContext, criterion: str) -> np.ndarray:
    if criterion == "bimodality_coefficient":
        bc = ctx.get("bimodality_coefficient").per_step["bimodality_coefficient"]
        return bc > ctx.settings.bimodality_threshold
    if criterion == "dip":
        pvalues = ctx.get("dip").per_step["dip_pvalue"]
        return pvalues < ctx.settings.dip_pvalue
    if criterion == "ashman_d":
        fit = ctx.get("gmm").per_step
        return (fit["ashman_d"] > ctx.settings.ashman_d_threshold) & (
            fit["gmm_minor_weight"] >= ctx.settings.gmm_min_weight
        )
    raise ValueError(f"no bimodal mask for criterion {criterion!r}")  # the schema admits only the three


@register_metric("bifurcation", "bimodality")
def bifurcation(traj: Trajectory, ctx: MetricContext) -> MetricResult:
    criterion = ctx.settings.bifurcation_criterion
    mask = bimodal_mask(ctx, criterion)
    index = onset_index(mask)
    result = MetricResult(
        per_step={"bimodal": mask.astype(float)}, tags={"garden.bifurcation_criterion": criterion}
    )
    if index is None:
        result.tags["garden.bifurcation"] = "none"
    else:
        result.tags["garden.bifurcation"] = "detected"
        result.summary["bifurcation_step"] = float(traj.steps[index])
    return result


@register_metric("stationary", "diffusion")
def stationary(traj: Trajectory, ctx: MetricContext) -> MetricResult:
    """First step from which the displacement rate stays below a fraction of its peak (working definition)."""
    relative = ctx.get("displacement").per_step["relative_displacement"]
    step = stationary_onset(traj.steps, relative, ctx.settings.stationary_threshold)
    result = MetricResult(tags={"garden.stationary": "none" if step is None else "detected"})
    if step is not None:
        result.summary["stationary_step"] = step
    return result


def stationary_onset(steps: np.ndarray, relative: np.ndarray, threshold: float) -> float | None:
    """The first step from which the relative displacement stays below `threshold` through the end."""
    defined = np.isfinite(relative)
    # The first step has no displacement (nothing before it): it neither breaks nor starts the stretch.
    index = onset_index(relative[defined] < threshold) if defined.any() else None
    return None if index is None else float(np.asarray(steps)[defined][index])
