"""The record of a dynamics job: what it logs to its (already started) MLflow run, under which names, and
the block a finished job prints (the CLI and the DVC `report` stage both use them).

Logged names (MLflow groups its charts by the part before the first `/`):

- `dist/…`, `diffusion/…`, `bimodality/…`, `units/…`: per-step series at `step=<training step>`, the
  namespace each metric registers with (`garden.metrics`);
- `eval/…`: the model-level evaluation (perplexity, LAMBADA, PER, CKA) at its steps;
- `train/loss`, `train/lr`: the tiny series' training, live while it trains; `extract/…`: the pass's
  progress;
- `summary/…`: one value per run. Every summary a metric produced is logged, and the event steps
  (`summary/bifurcation_step`, `summary/unit_bifurcation_step`, `summary/stationary_step`) are logged
  whenever their metric ran: -1 (`NOT_FOUND`) when looked for and not reached (the tag `garden.<event>`
  says "none"), NaN when not defined (e.g. units off, or a distance to an event that is -1).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from garden.metrics import EVENT_TAGS
from garden.settings import GardenConfig, as_plain
from garden.tracking import MlflowTracker, flatten

log = logging.getLogger("garden")

#: The logged value of an event step looked for and not reached (sortable and filterable, unlike null).
NOT_FOUND = -1.0
SUMMARY = "summary/"
EVALUATION = "eval/"


def summary_metrics(summary: Mapping[str, float | None], tags: Mapping[str, str]) -> dict[str, float]:
    """`summary/<key>` for every summary value, and for every event whose metric ran (see the module's
    docstring for -1 and NaN)."""
    logged = {
        f"{SUMMARY}{key}": float(value) if value is not None else math.nan for key, value in summary.items()
    }
    for key, tag in EVENT_TAGS.items():
        state = tags.get(tag)
        if state == "none":
            logged[f"{SUMMARY}{key}"] = NOT_FOUND
        elif state is not None:
            logged.setdefault(f"{SUMMARY}{key}", math.nan)
    return logged


def logged_value(metrics: Mapping[str, float], key: str) -> float:
    """A run's summary value read back from MLflow (runs logged before the namespaces had bare keys);
    NaN for NOT_FOUND, absent or undefined."""
    value = metrics.get(f"{SUMMARY}{key}", metrics.get(key, math.nan))
    return math.nan if value == NOT_FOUND and key in EVENT_TAGS else float(value)


def run_params(settings: GardenConfig, groups: list[str], resolved: Mapping[str, str]) -> dict[str, str]:
    """The params of a run: the settings of the groups the task uses (`groups`, every setting with its
    value, defaults included), what garden resolved (device, output folder), and, under Hydra, the group
    choices and the command line's overrides."""
    params = flatten({group: as_plain(getattr(settings, group)) for group in groups})
    params.update({f"resolved.{key}": str(value) for key, value in resolved.items()})
    params.update(hydra_params())
    return params


def hydra_params() -> dict[str, str]:
    """`hydra.choices.<group>` for each config group and `hydra.overrides` (the command line's key=value
    list); nothing outside a Hydra job (a test, a DVC stage)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    choices = {
        f"hydra.choices.{group}": str(choice)
        for group, choice in hydra_cfg.runtime.choices.items()
        if not group.startswith("hydra/")
    }
    return {**choices, "hydra.overrides": " ".join(hydra_cfg.overrides.task) or "(none)"}


def command_line() -> str | None:
    """The job's command, as the user would retype it (None outside a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return " ".join(["python -m garden", *HydraConfig.get().overrides.task])


def log_results(tracker: MlflowTracker, folder: Path, steps, step_series: Mapping[str, np.ndarray],
                evaluation: pd.DataFrame | None, summary: dict[str, float], tags: dict[str, str],
                extra_artifacts=()) -> None:  # fmt: skip
    """Everything a dynamics run records in its (already started) MLflow run, once analysed;
    `step_series` is keyed by logged name (`step_metrics`)."""
    tracker.log_step_metrics(steps, step_series)
    if evaluation is not None:
        tracker.log_table(evaluation, "step", prefix=EVALUATION)
    tracker.log_summary(summary_metrics(summary, tags))
    tracker.set_tags(tags)
    tracker.log_artifacts(folder / "tables", "tables")
    tracker.log_artifacts(folder / "figures", "figures")
    tracker.log_artifact(folder / "summary.json")
    for extra in extra_artifacts:
        if Path(extra).is_file():
            tracker.log_artifact(Path(extra), "series")


def log_training_history(tracker: MlflowTracker, history: pd.DataFrame | None) -> None:
    """A training log (step, loss, lr) as `train/...` metrics: for a series trained before this run."""
    if history is not None and len(history):
        tracker.log_table(history, "step", prefix="train/")


def _step(value: float | None) -> str:
    return f"step {value:g}"


def headline(summary: Mapping[str, float | None], tags: Mapping[str, str]) -> list[tuple[str, str]]:
    """The run's headline results as (what, value) rows: the terminal's block and the run description."""

    def event(key: str, why: str = " (looked for, not reached)") -> str:
        value = summary.get(key)
        if value is not None and math.isfinite(value):
            return f"at {_step(value)}"
        state = tags.get(EVENT_TAGS[key])
        return f"none{why}" if state == "none" else (state or "not computed")

    rows = [("pooled bifurcation", event("bifurcation_step"))]
    if "final_bimodal_unit_fraction" in summary:
        fraction, count = summary["final_bimodal_unit_fraction"], summary["n_units"]
        share = f"{fraction:.0%} of {count:g} units bimodal at the end"
        rows.append(("unit bifurcation", f"{event('unit_bifurcation_step', '')} ({share})"))
    else:
        rows.append(("unit bifurcation", tags.get("garden.units", "not computed")))
    rows.append(("stationary", event("stationary_step")))
    for name in ("stationary", "unit_bifurcation"):  # the live monitor's, where one watched the training
        declared = summary.get(f"live_{name}_declared_step")
        if declared is not None:
            found = f"declared at {_step(declared)} (from {_step(summary[f'live_{name}_step'])})"
            rows.append((f"{name.replace('_', ' ')}, live", found if declared >= 0 else "not declared"))
    if summary.get("stopped_step") is not None:
        reason = tags.get("garden.stop_reason")
        rows.append(("training stopped", f"at {_step(summary['stopped_step'])}: {reason}"))
    regimes = summary.get("msd_regimes")
    if regimes:
        slopes = " → ".join(f"t^{summary[f'msd_regime{i}_alpha']:.2f}" for i in range(1, int(regimes) + 1))
        breaks = ", ".join(_step(summary[f"msd_break{i}_step"]) for i in range(1, int(regimes)))
        rows.append(("MSD regimes", slopes + (f" (breaks at {breaks})" if breaks else "")))
    if summary.get("alpha") is not None:
        rows.append(("MSD one power law", f"alpha {summary['alpha']:.3f} (r² {summary['alpha_r2']:.2f})"))
    if summary.get("final_perplexity") is not None:
        rows.append(("final perplexity", f"{summary['final_perplexity']:.2f}"))
    return rows


def markdown_rows(rows: list[tuple[str, str]]) -> list[str]:
    """(what, value) rows as the lines of a Markdown table: a run description's results."""
    return ["| result | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def aligned_rows(rows: list[tuple[str, str]]) -> str:
    """(what, value) rows as an indented two-column block: what a finished job prints."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def describe(run_name: str, what: str, summary: Mapping, tags: Mapping, output_dir: Path) -> str:
    """The run's description (Markdown): what it is, its headline results, the command, its folder."""
    command = command_line()
    lines = [f"**{run_name}**: {what}", "", *markdown_rows(headline(summary, tags))]
    lines += ["", f"Command: `{command}`" if command else "", f"Tables and figures: `{output_dir}`"]
    return "\n".join(lines)


def log_outcome(run_name: str, summary: dict, tags: dict, output_dir: Path, run_id: str | None,
                tracking_uri: str | None = None, experiment: str | None = None) -> None:  # fmt: skip
    """What a finished job prints: its headline results, where they are, and how to open them."""
    rows = [*headline(summary, tags), ("results", f"{output_dir} (tables/, figures/, summary.json)")]
    if tracking_uri:
        rows += [("MLflow run", f"{run_id} in experiment {experiment or 'garden'}"),
                 *open_rows(tracking_uri, experiment or "garden", run_id)]  # fmt: skip
    log.info("%s finished:\n%s", run_name, aligned_rows(rows))


#: What `mlflow ui` serves on by default.
UI_ADDRESS = "http://127.0.0.1:5000"


def absolute_store(tracking_uri: str) -> str:
    """A sqlite store's URI with an absolute path: `sqlite:///mlflow.db` opened from another folder would
    be another, empty store, without an error."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not tracking_uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(tracking_uri[len(prefix) :]).resolve())
    return tracking_uri


def run_link(tracking_uri: str, experiment: str, run_id: str | None) -> str | None:
    """The run's page in `mlflow ui`, on MLflow 3's "Model training" view (`workflowType`)."""
    from mlflow.tracking import MlflowClient

    try:
        found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    except Exception:  # a link is a convenience: the run is recorded either way
        return None
    if found is None or run_id is None:
        return None
    return f"{UI_ADDRESS}/#/experiments/{found.experiment_id}/runs/{run_id}?workflowType=machine_learning"


def open_rows(tracking_uri: str, experiment: str, run_id: str | None) -> list[tuple[str, str]]:
    """How to open the run: the command, with the store's absolute path, and the run's own page."""
    store = absolute_store(tracking_uri)
    rows = [("open it", f"mlflow ui --backend-store-uri {store} --workers 1   (or: make ui)")]
    link = run_link(tracking_uri, experiment, run_id)
    if link is not None:
        rows.append(("", f"then {link}"))
    return rows
