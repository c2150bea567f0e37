"""Diffusion of the parameters: MSD from the reference, step-to-step displacement, lag MSD, alpha.

Working definitions of REFERENCE section 3: MSD(t) = mean_i (w_i(t) - w_i(t0))^2;
D(t_k) = mean_i (w_i(t_k) - w_i(t_k-1))^2 / (t_k - t_k-1); MSD ~ t^alpha fitted on log-log.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from garden.metrics.registry import MetricContext, MetricResult, register_metric
from garden.trajectory import Trajectory


@register_metric("msd", "diffusion")
def msd(traj: Trajectory, ctx: MetricContext) -> MetricResult:
    values = traj.column("msd")
    return MetricResult(per_step={"msd": values}, summary={"final_msd": float(values[-1])})


def relative_displacement(rate: np.ndarray) -> np.ndarray:
    """The displacement rate over its peak (NaN throughout when there is no positive peak)."""
    peak = np.nanmax(rate) if np.isfinite(rate).any() else np.nan
    return rate / peak if peak and np.isfinite(peak) and peak > 0 else np.full_like(rate, np.nan)


@register_metric("displacement", "diffusion")
def displacement(traj: Trajectory, ctx: MetricContext) -> MetricResult:
    rate = traj.column("displacement")
    relative = relative_displacement(rate)
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


@register_metric("alpha", "diffusion")
def alpha(traj: Trajectory, ctx: MetricContext) -> MetricResult:
    """Diffusion exponent: MSD ~ t^alpha over [alpha_min_step, alpha_max_step], plus the local slope."""
    steps = traj.steps.astype(float)
    values = traj.column("msd")
    lo = ctx.settings.alpha_min_step
    hi = float(steps.max()) if ctx.settings.alpha_max_step is None else ctx.settings.alpha_max_step
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


def segmented_power_law(x: np.ndarray, y: np.ndarray, max_segments: int, min_points: int) -> dict:
    """The piecewise power law y ~ x^alpha_k that fits best: least squares of log y on log x in up to
    `max_segments` consecutive segments of at least `min_points` points each, the number chosen by BIC.

    Segments are fitted independently (a line each, not forced to meet): the optimal split for each count
    is found exactly by dynamic programming over prefix sums, O(segments · n²). Returns the chosen
    segments as (start index, end index exclusive, slope, log-intercept), the BIC per count tried, and
    the fit's r² in log space. Written here: scipy has no segmented regression, and the packages that do
    (e.g. `piecewise-regression`) fit continuous hinges by iterating from guessed breakpoints.
    """
    lx, ly = np.log(x), np.log(y)
    n = len(lx)
    s = [np.concatenate([[0.0], np.cumsum(v)]) for v in (np.ones(n), lx, ly, lx * lx, lx * ly, ly * ly)]

    def line(i: int, j: int) -> tuple[float, float, float]:
        """Slope, intercept and residual sum of squares of the least-squares line through points i..j-1."""
        c, sx, sy, sxx, sxy, syy = (v[j] - v[i] for v in s)
        vxx, vxy, vyy = sxx - sx * sx / c, sxy - sx * sy / c, syy - sy * sy / c
        slope = vxy / vxx if vxx > 0 else 0.0
        return slope, (sy - slope * sx) / c, max(vyy - slope * vxy, 0.0)

    rss = np.full((n + 1, n + 1), np.inf)
    for i in range(n):
        for j in range(i + min_points, n + 1):
            rss[i, j] = line(i, j)[2]
    most = max(1, min(max_segments, n // min_points))
    best = np.full((most + 1, n + 1), np.inf)  # best[k, j]: k segments covering points 0..j-1
    cut = np.zeros((most + 1, n + 1), dtype=int)
    best[1] = rss[0]
    for k in range(2, most + 1):
        for j in range(k * min_points, n + 1):
            options = best[k - 1, :j] + rss[:j, j]
            cut[k, j] = int(np.argmin(options))
            best[k, j] = options[cut[k, j]]
    total = float(((ly - ly.mean()) ** 2).sum())
    floor = 1e-12 * max(total, 1e-300)  # an exact fit is not infinitely better than a near-exact one
    bic = {k: n * np.log(max(best[k, n], floor) / n) + (3 * k - 1) * np.log(n)
           for k in range(1, most + 1) if np.isfinite(best[k, n])}  # fmt: skip
    chosen = min(bic, key=bic.get)
    bounds, j = [n], n
    for k in range(chosen, 1, -1):
        j = cut[k, j]
        bounds.append(j)
    bounds = [0, *reversed(bounds)]
    segments = [(i, j, *line(i, j)[:2]) for i, j in itertools.pairwise(bounds)]
    r2 = 1.0 - best[chosen, n] / total if total > 0 else float("nan")
    return {"segments": segments, "bic": bic, "r2": float(r2)}


@register_metric("msd_regimes", "diffusion")
def msd_regimes(traj: Trajectory, ctx: MetricContext) -> MetricResult:
    """MSD ~ t^alpha in regimes: the segmented power law (`segmented_power_law`) over the steps after 0,
    so that a ballistic start, a diffusive middle and a plateau each get their own exponent. Summary:
    `msd_regimes`, `msd_regime<k>_alpha` and `msd_break<k>_step` (the first step of regime k+1)."""
    steps, values = traj.steps.astype(float), traj.column("msd")
    keep = (steps > 0) & (values > 0) & np.isfinite(values)
    min_points = ctx.settings.msd_min_points
    result = MetricResult(tags={"garden.msd_regimes": "fitted"})
    if keep.sum() < min_points:
        result.tags["garden.msd_regimes"] = f"not fitted: {int(keep.sum())} positive MSD values"
        return result
    x, y = steps[keep], values[keep]
    fit = segmented_power_law(x, y, ctx.settings.msd_max_regimes, min_points)
    rows = []
    for k, (i, j, slope, intercept) in enumerate(fit["segments"], start=1):
        rows.append({"regime": k, "first_step": x[i], "last_step": x[j - 1], "alpha": slope,
                     "log_intercept": intercept, "points": j - i})  # fmt: skip
        result.summary[f"msd_regime{k}_alpha"] = float(slope)
        if k > 1:
            result.summary[f"msd_break{k - 1}_step"] = float(x[i])
    result.summary["msd_regimes"] = float(len(rows))
    result.summary["msd_regimes_r2"] = fit["r2"]
    result.tables["msd_regimes"] = pd.DataFrame(rows)
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


@register_metric("lag_msd", "diffusion")
def lag_msd(traj: Trajectory, ctx: MetricContext) -> MetricResult:
    """Time-averaged MSD over pairs of checkpoints `lag` apart (evenly spaced part of the schedule).

    Uses the seeded distribution sample of parameters: an unbiased estimate of the mean over all of them.
    """
    start, spacing = evenly_spaced_tail(traj.steps)
    values = traj.distribution_sample[start:]
    max_lag = min(ctx.settings.lag_msd_max_lag, len(values) - 1)
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
