"""Shape of the parameter distribution per step: moments and three bimodality criteria.

Sarle's coefficient uses the full tensor's skewness and kurtosis; Hartigan's dip and the two-component
Gaussian mixture (with Ashman's D) use the seeded distribution sample kept per step.
"""

from __future__ import annotations

import diptest
import numpy as np

from garden.metrics.registry import MetricContext, MetricResult, register_metric
from garden.trajectory import Trajectory, sarle_bimodality

MOMENT_COLUMNS = ("mean", "std", "rms", "skewness", "kurtosis", "min", "max")


@register_metric("moments", "dist")
def moments(traj: Trajectory, ctx: MetricContext) -> MetricResult:
    """The trajectory's moments and quantiles; its `kurtosis` column is excess kurtosis (0 for a
    Gaussian), reported under that name."""
    names = list(MOMENT_COLUMNS) + [c for c in traj.table.columns if c.startswith("q")]
    return MetricResult(
        per_step={"excess_kurtosis" if name == "kurtosis" else name: traj.column(name) for name in names}
    )


@register_metric("bimodality_coefficient", "bimodality")
def bimodality_coefficient(traj: Trajectory, ctx: MetricContext) -> MetricResult:
    bc = sarle_bimodality(traj.column("skewness"), traj.column("kurtosis"), traj.n)
    return MetricResult(
        per_step={"bimodality_coefficient": bc}, summary={"final_bimodality_coefficient": bc[-1]}
    )


@register_metric("dip", "bimodality")
def dip(traj: Trajectory, ctx: MetricContext) -> MetricResult:
    """Hartigan's dip statistic and its p-value (diptest's interpolation table) on the sample."""
    stats = np.array([diptest.diptest(np.asarray(row, dtype=np.float64)) for row in traj.distribution_sample])
    return MetricResult(per_step={"dip": stats[:, 0], "dip_pvalue": stats[:, 1]})


def ashman_d(mu1: float, mu2: float, var1: float, var2: float) -> float:
    """D = sqrt(2) |mu1 - mu2| / sqrt(s1^2 + s2^2); D > 2 means the components separate cleanly."""
    return float(np.sqrt(2.0) * abs(mu1 - mu2) / np.sqrt(var1 + var2))


def fit_two_gaussians(sample: np.ndarray, seed: int) -> tuple[float, float, float, float]:
    """(Ashman's D, smaller weight, lower mean, higher mean) of a seeded two-component mixture."""
    if np.ptp(sample) == 0:  # a point mass: one component, no separation
        return 0.0, 0.0, float(sample[0]), float(sample[0])
    from sklearn.mixture import GaussianMixture  # imported here: ~1 s, paid only by runs that fit one

    model = GaussianMixture(n_components=2, random_state=seed, n_init=1, max_iter=200)
    model.fit(sample.reshape(-1, 1))
    means = model.means_.ravel()
    variances = model.covariances_.reshape(-1)
    low, high = np.argsort(means)
    return (
        ashman_d(means[0], means[1], variances[0], variances[1]),
        float(model.weights_.min()),
        float(means[low]),
        float(means[high]),
    )


@register_metric("gmm", "bimodality")
def gmm(traj: Trajectory, ctx: MetricContext) -> MetricResult:
    """Two-component Gaussian mixture per step on the distribution sample, summarised by Ashman's D."""
    seed = ctx.seed
    fits = np.array(
        [fit_two_gaussians(np.asarray(row, dtype=np.float64), seed) for row in traj.distribution_sample]
    )
    # gmm_minor_weight: the smaller component's weight (metrics.gmm_min_weight is its threshold).
    names = ("ashman_d", "gmm_minor_weight", "gmm_mean_low", "gmm_mean_high")
    return MetricResult(per_step={name: fits[:, i] for i, name in enumerate(names)})
