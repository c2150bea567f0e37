"""One registry of metrics (garden.metrics.registry), the modules that fill it, and the run's headline.

A metric is a small function of a Trajectory, registered by name: `compute_metrics` runs the ones
`metrics.names` lists (and whatever they ask for, computed once and shared).
"""

from __future__ import annotations

from collections.abc import Iterable

from garden.errors import GardenError
from garden.metrics import diffusion, distribution, events, units  # noqa: F401  (they register metrics)
from garden.metrics.registry import METRICS, NAMESPACES, MetricContext, MetricResult, register_metric
from garden.trajectory import Trajectory

__all__ = ["EVENT_TAGS", "HEADLINE", "METRICS", "NAMESPACES", "MetricContext", "MetricResult",
           "available_metrics", "compute_metrics", "namespace_of", "register_metric",
           "validate_metric_names"]  # fmt: skip

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


def available_metrics() -> list[str]:
    return sorted(METRICS)


def validate_metric_names(names: Iterable[str]) -> list[str]:
    names = METRICS.check(names)
    if not names:
        raise GardenError(f"metrics.names is empty; valid: {', '.join(available_metrics())}")
    return names


def compute_metrics(trajectory: Trajectory, names: Iterable[str], params=None) -> dict[str, MetricResult]:
    """Compute the named metrics (and whatever they depend on, unreported) in order."""
    context = MetricContext(trajectory, params)
    return {name: context.get(name) for name in validate_metric_names(names)}
