"""One registry of metrics (garden.metrics.registry), the modules that fill it, and the run's headline.

A metric is a small function of a Trajectory, registered by name: `compute_metrics` runs the ones
`metrics.names` lists (and whatever they ask for, computed once and shared).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from garden.metrics import diffusion, distribution, events, units  # noqa: F401  (they register metrics)
from garden.metrics.registry import METRICS, NAMESPACES, MetricContext, MetricResult, register_metric
from garden.settings import MetricSettings, read_section
from garden.trajectory import Trajectory

__all__ = ["EVENT_TAGS", "HEADLINE", "METRICS", "NAMESPACES", "MetricContext", "MetricResult",
           "available_metrics", "compute_metrics", "namespace_of", "register_metric",
           "step_metrics", "validate_metric_names"]  # fmt: skip

# A run's headline numbers (summary keys): the DVC study's metrics file and garden.compare's table.
HEADLINE = (
    "bifurcation_step",
    "unit_bifurcation_step",
    "final_bimodal_unit_fraction",
    "stationary_step",
    "alpha",
    "final_perplexity",
)

#: Headline events and the tag their metric sets: "none" there means looked for and not found.
EVENT_TAGS = {
    "bifurcation_step": "garden.bifurcation",
    "unit_bifurcation_step": "garden.unit_bifurcation",
    "stationary_step": "garden.stationary",
}


def namespace_of(name: str) -> str:
    return METRICS[name].namespace


def step_metrics(results: dict[str, MetricResult]) -> dict[str, np.ndarray]:
    """Each reported metric's per-step series under its namespace: `diffusion/msd`, `units/...`."""
    return {
        f"{namespace_of(name)}/{key}": values
        for name, result in results.items()
        for key, values in result.per_step.items()
    }


def available_metrics() -> list[str]:
    return sorted(METRICS)


def validate_metric_names(names: Iterable[str]) -> list[str]:
    return METRICS.check(names)


def compute_metrics(
    trajectory: Trajectory, names: Iterable[str], settings: MetricSettings | dict | None = None, seed: int = 0
) -> dict[str, MetricResult]:
    """Compute the named metrics (and whatever they depend on, unreported) in order; `settings` are the
    metric settings (a dict of some of them is checked by the schema, the rest at their defaults)."""
    names = list(names)
    if not isinstance(settings, MetricSettings):
        given = dict(settings or {})
        seed = int(given.pop("seed", seed))
        settings = read_section(MetricSettings, {"names": names, **given}, "metrics.")
    context = MetricContext(trajectory, settings, seed)
    return {name: context.get(name) for name in validate_metric_names(names)}
