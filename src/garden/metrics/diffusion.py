"""Diffusion of the parameters: MSD from the reference, step-to-step displacement, lag MSD, alpha.

Working definitions of REFERENCE section 3: MSD(t) = mean_i (w_i(t) - w_i(t0))^2;
D(t_k) = mean_i (w_i(t_k) - w_i(t_k-1))^2 / (t_k - t_k-1); MSD ~ t^alpha fitted on log-log.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from garden.metrics import MetricContext, MetricResult, register_metric
from garden.trajectory import Trajectory


@register_metric("msd")
def msd(traj: Trajectory, ctx: MetricContext) -> MetricResult:
    values = traj.column("msd")
    return MetricResult(per_step={"msd": values}, summary={"final_msd": float(values[-1])})


@register_metric("displacement")
def displacement(traj: Trajectory, ctx: MetricContext) -> MetricResult:
    rate = traj.column("displacement")
    peak = np.nanmax(rate) if np.isfinite(rate).any() else np.nan
    relative = rate / peak if peak and np.isfinite(peak) and peak > 0 else np.full_like(rate, np.nan)
    return MetricResult(
        per_step={
            "displacement": rate,
            "step_msd": traj.column("step_msd"),
            "relative_displacement": relative,
        },
        summary={"peak_displacement_step": float(traj.steps[int(np.nanargmax(rate))])}
        if np.isfinite(rate).any()
        else {},
    )


def power_law_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """Least squares of log y on log x over positive pairs: (exponent, log-intercept, r^2)."""
    keep = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 2:
        return None
    lx, ly = np.log(x[keep]), np.log(y[keep])
    slope, intercept = np.polyfit(lx, ly, 1)
    residual = ly - (slope * lx + intercept)
    total = ((ly - ly.mean()) ** 2).sum()
    r2 = 1.0 - (residual**2).sum() / total if total > 0 else float("nan")
    return float(slope), float(intercept), float(r2)


@register_metric("alpha")
def alpha(traj: Trajectory, ctx: MetricContext) -> MetricResult:
    """Diffusion exponent: MSD ~ t^alpha over [alpha_min_step, alpha_max_step], plus the local slope."""
    steps = traj.steps.astype(float)
    values = traj.column("msd")
    lo = ctx.param("alpha_min_step", 1)
    hi = ctx.param("alpha_max_step", float(steps.max()))
    window = (steps >= lo) & (steps <= hi)
    local = np.full_like(values, np.nan)
    positive = (steps > 0) & (values > 0)
    if positive.sum() >= 2:
        local[positive] = np.gradient(np.log(values[positive]), np.log(steps[positive]))
    result = MetricResult(per_step={"msd_local_slope": local})
    fit = power_law_fit(steps[window], values[window])
    if fit is not None:
        slope, intercept, r2 = fit
        result.summary.update({"alpha": slope, "alpha_log_intercept": intercept, "alpha_r2": r2})
    return result


def evenly_spaced_tail(steps: np.ndarray) -> tuple[int, int]:
    """Start index and spacing of the longest evenly spaced run that ends at the last step."""
    if len(steps) < 2:
        return 0, 0
    spacing = int(steps[-1] - steps[-2])
    start = len(steps) - 1
    while start > 0 and steps[start] - steps[start - 1] == spacing:
        start -= 1
    return start, spacing


@register_metric("lag_msd")
def lag_msd(traj: Trajectory, ctx: MetricContext) -> MetricResult:
    """Time-averaged MSD over pairs of checkpoints `lag` apart (evenly spaced part of the schedule).

    Uses the seeded distribution sample of parameters: an unbiased estimate of the mean over all of them.
    """
    start, spacing = evenly_spaced_tail(traj.steps)
    values = traj.distribution_sample[start:]
    max_lag = min(int(ctx.param("lag_msd_max_lag", 20)), len(values) - 1)
    rows = []
    for lag in range(1, max_lag + 1):
        diffs = values[lag:] - values[:-lag]
        rows.append({"lag_checkpoints": lag, "lag_steps": lag * spacing, "tamsd": float((diffs**2).mean())})
    table = pd.DataFrame(rows, columns=["lag_checkpoints", "lag_steps", "tamsd"])
    result = MetricResult(tables={"lag_msd": table})
    if len(table) >= 2:
        fit = power_law_fit(table["lag_steps"].to_numpy(float), table["tamsd"].to_numpy(float))
        if fit is not None:
            result.summary["lag_msd_alpha"] = fit[0]
    return result
