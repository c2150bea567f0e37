"""One registry of metrics. A metric is a small function of a Trajectory, registered by name.

A metric returns per-step series (logged to MLflow with `step=<training step>`), summary scalars, tags
and tables; it may ask the context for another metric's result (the bifurcation onset reads the
bimodality series), which is computed once and shared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from garden.errors import GardenError
from garden.trajectory import Trajectory


@dataclass
class MetricResult:
    per_step: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


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

#: What MLflow groups a metric's per-step series under (`<namespace>/<key>`): its charts then sit in one
#: section per kind of quantity instead of one alphabetical list.
NAMESPACES = ("dist", "diffusion", "bimodality", "units")

MetricFn = Callable[[Trajectory, "MetricContext"], MetricResult]
_REGISTRY: dict[str, MetricFn] = {}
_NAMESPACE: dict[str, str] = {}


def register_metric(name: str, namespace: str) -> Callable[[MetricFn], MetricFn]:
    """Register a metric; its per-step series are logged as `<namespace>/<key>`."""
    if namespace not in NAMESPACES:
        raise ValueError(f"metric {name!r}: namespace {namespace!r} is not one of {NAMESPACES}")

    def decorate(fn: MetricFn) -> MetricFn:
        if name in _REGISTRY:
            raise ValueError(f"metric {name!r} registered twice")
        _REGISTRY[name] = fn
        _NAMESPACE[name] = namespace
        return fn

    return decorate


def namespace_of(name: str) -> str:
    return _NAMESPACE[name]


def available_metrics() -> list[str]:
    return sorted(_REGISTRY)


def validate_metric_names(names: Iterable[str]) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise GardenError(f"unknown metric(s) {unknown}; valid: {', '.join(available_metrics())}")
    if not names:
        raise GardenError(f"metrics.names is empty; valid: {', '.join(available_metrics())}")
    return names


class MetricContext:
    """Holds the trajectory, the metric settings, and each metric's result once computed."""

    def __init__(self, trajectory: Trajectory, params):
        self.trajectory = trajectory
        self.params = params
        self._results: dict[str, MetricResult] = {}

    def param(self, name: str, default=None):
        value = self.params.get(name, default) if self.params is not None else default
        return default if value is None else value

    def get(self, name: str) -> MetricResult:
        if name not in self._results:
            validate_metric_names([name])
            self._results[name] = _REGISTRY[name](self.trajectory, self)
        return self._results[name]


def compute_metrics(trajectory: Trajectory, names: Iterable[str], params=None) -> dict[str, MetricResult]:
    """Compute the named metrics (and whatever they depend on, unreported) in order."""
    context = MetricContext(trajectory, params)
    return {name: context.get(name) for name in validate_metric_names(names)}


# Import the modules that register metrics (kept last: they import register_metric from here).
from garden.metrics import diffusion, distribution, events, units  # noqa: E402, F401
