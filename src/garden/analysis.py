"""The analysis stage of a dynamics job: the metric registry on a trajectory, then its tables, figures
and summary.json (what the CLI and the DVC `metrics` stage both write)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from garden.metrics import EVENT_TAGS, MetricResult, compute_metrics
from garden.settings import GardenConfig
from garden.trajectory import Trajectory


@dataclass
class Analysis:
    """What the metric registry made of a trajectory: per-step series, summary values and tags."""

    trajectory: Trajectory
    results: dict[str, MetricResult]
    per_step: dict
    summary: dict[str, float]
    tags: dict[str, str]


def analyse(settings: GardenConfig, trajectory: Trajectory, job_summary: dict[str, float]) -> Analysis:
    """Run the configured metrics on a trajectory; `job_summary` holds the job's own counts."""
    results = compute_metrics(trajectory, settings.metrics.names, settings.metrics, seed=settings.seed)
    per_step: dict = {}
    summary = {
        "n_steps": float(len(trajectory.steps)),
        "n_parameters": float(trajectory.n),
        **job_summary,
    }
    excluded = trajectory.meta.get("excluded_steps") or {}
    summary["n_excluded_steps"] = float(len(excluded))
    tags: dict[str, str] = {
        "garden.excluded_steps": "; ".join(f"step{s}: {why}" for s, why in excluded.items()) or "none"
    }
    for result in results.values():
        per_step.update(result.per_step)
        summary.update(result.summary)
        tags.update(result.tags)
    return Analysis(trajectory, results, per_step, summary, tags)


def write_dynamics(folder: Path, analysis: Analysis, run_name: str, settings: GardenConfig) -> None:
    """Per-step tables, the metrics' extra tables and the dynamics figures."""
    from garden.figures import density_table, draw_all, trajectory_branches

    trajectory = analysis.trajectory
    tables = folder / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    table = trajectory.table.copy()
    for name, values in analysis.per_step.items():
        table[name] = values
    table.to_csv(tables / "steps.csv", index=False)
    for result in analysis.results.values():
        for name, extra in result.tables.items():
            extra.to_csv(tables / f"{name}.csv", index=False)
    # The figures' data: the sampled parameters' paths (a column per flat index) and final branches, and
    # the density matrix.
    paths = pd.DataFrame(trajectory.trajectories, columns=[str(i) for i in trajectory.trajectory_indices])
    paths.insert(0, "step", trajectory.steps)
    paths.to_csv(tables / "trajectories.csv", index=False)
    onset = analysis.summary.get("bifurcation_step")
    forked = onset is not None and math.isfinite(onset)
    trajectory_branches(trajectory, forked).to_csv(tables / "trajectory_branches.csv", index=False)
    density_table(trajectory).to_csv(tables / "density.csv", index=False)
    if settings.figures:
        draw_all(trajectory, analysis.results, run_name, settings.metrics, folder / "figures")


def write_summary(folder: Path, run_name: str, summary: dict, tags: dict) -> None:
    (folder / "summary.json").write_text(
        json.dumps({"run_name": run_name, "summary": plain_summary(summary, tags), "tags": tags}, indent=1)
    )


def _whole_number(key: str) -> bool:
    """Summary keys that hold training steps, step differences or counts."""
    return (key.endswith(("_step", "_steps", "_block", "_drop")) or key.startswith("n_")
            or key in ("msd_regimes", "scan_tensors"))  # fmt: skip


def plain_summary(summary: dict, tags: dict) -> dict:
    """The summary as `summary.json` holds it (strict JSON, as the README says): every event whose metric
    ran is present, null where it was not reached; an undefined value is null, not NaN (which is not
    JSON); steps and counts are integers."""
    plain: dict = {}
    for key, value in summary.items():
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            plain[key] = None
        elif _whole_number(key) and float(value).is_integer():
            plain[key] = int(value)
        else:
            plain[key] = float(value) if isinstance(value, np.floating) else value
    for key, tag in EVENT_TAGS.items():
        if tags.get(tag) is not None:
            plain.setdefault(key, None)
    return plain
