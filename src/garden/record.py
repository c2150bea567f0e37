"""The record of a dynamics job: everything it logs to its (already started) MLflow run, and the one line
a finished job prints (the CLI and the DVC `report` stage both use them)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from garden.tracking import MlflowTracker

log = logging.getLogger("garden")


def log_results(tracker: MlflowTracker, folder: Path, steps, per_step: dict, evaluation: pd.DataFrame | None,
                summary: dict[str, float], tags: dict[str, str], extra_artifacts=()) -> None:  # fmt: skip
    """Everything a dynamics run records in its (already started) MLflow run."""
    tracker.log_step_metrics(steps, per_step)
    if evaluation is not None:
        tracker.log_table(evaluation, "step")
    tracker.log_summary(summary)
    tracker.set_tags(tags)
    tracker.log_artifacts(folder / "tables", "tables")
    tracker.log_artifacts(folder / "figures", "figures")
    tracker.log_artifact(folder / "summary.json")
    for extra in extra_artifacts:
        if Path(extra).is_file():
            tracker.log_artifact(Path(extra), "series")


def log_outcome(run_name: str, summary: dict, tags: dict, output_dir: Path, run_id: str | None,
                tracking_uri: str | None = None, experiment: str | None = None) -> None:  # fmt: skip
    """What a finished job prints: one line with its headline numbers and where the results are, then
    how to open them in the MLflow UI."""
    bifurcation = summary.get("bifurcation_step")
    unit_onset = summary.get("unit_bifurcation_step")
    stationary = summary.get("stationary_step")
    if "final_bimodal_unit_fraction" in summary:
        fraction, count = summary["final_bimodal_unit_fraction"], summary["n_units"]
        share = f"{fraction:.0%} of {count:g} units bimodal at the end"
        units = f"at step {unit_onset:g} ({share})" if unit_onset is not None else f"none ({share})"
    else:
        units = tags.get("garden.unit_bifurcation", "not computed")
    log.info(
        "%s: pooled bifurcation %s, unit bifurcation %s, stationary step %s, alpha %s; results in %s "
        "(MLflow run %s)",
        run_name,
        f"at step {bifurcation:g}"
        if bifurcation is not None
        else tags.get("garden.bifurcation", "not computed"),
        units,
        f"{stationary:g}" if stationary is not None else "none",
        f"{summary['alpha']:.3f}" if "alpha" in summary else "n/a",
        output_dir,
        run_id,
    )
    if tracking_uri:
        log.info(
            "open it: mlflow ui --backend-store-uri %s --workers 1  (or make ui), then "
            "http://127.0.0.1:5000, experiment %s (MLflow 3 opens on its GenAI view: switch to Model "
            "training); tables, figures and summary.json are also in %s",
            tracking_uri, experiment or "garden", output_dir,
        )  # fmt: skip
