"""The metric registry: a metric is a small function of a Trajectory, registered by name and namespace.

A metric returns per-step series (logged to MLflow with `step=<training step>`), summary scalars, tags
and tables; it may ask the context for another metric's result (the bifurcation onset reads the
bimodality series), which is computed once and shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from garden.registry import Registry
from garden.settings import MetricSettings
from garden.trajectory import Trajectory


@dataclass
class MetricResult:
    per_step: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


#: What MLflow groups a metric's per-step series under (`<namespace>/<key>`): its charts then sit in one
#: section per kind of quantity instead of one alphabetical list.
NAMESPACES = ("dist", "diffusion", "bimodality", "units")

MetricFn = Callable[[Trajectory, "MetricContext"], MetricResult]


@dataclass(frozen=True)
class Metric:
    compute: MetricFn
    namespace: str


METRICS: Registry[Metric] = Registry("metric", "metrics.names")


def register_metric(name: str, namespace: str) -> Callable[[MetricFn], MetricFn]:
    """Register a metric; its per-step series are logged as `<namespace>/<key>`."""
    if namespace not in NAMESPACES:
        raise ValueError(f"metric {name!r}: namespace {namespace!r} is not one of {NAMESPACES}")
    return METRICS.register(name, lambda fn: Metric(fn, namespace))


class MetricContext:
    """Holds the trajectory, the metric settings (garden.settings.MetricSettings: thresholds and windows,
    each with its schema default), the job's seed, and each metric's result once computed."""

    def __init__(self, trajectory: Trajectory, settings: MetricSettings, seed: int = 0):
        self.trajectory = trajectory
        self.settings = settings
        self.seed = seed
        self._results: dict[str, MetricResult] = {}

    def get(self, name: str) -> MetricResult:
        if name not in self._results:
            self._results[name] = METRICS.resolve(name).compute(self.trajectory, self)
        return self._results[name]
