"""Task `dynamics`: checkpoint series -> one tensor per step -> trajectory -> metrics -> MLflow run.

Stage functions with typed results, called alike by `run` (the CLI, sweeps), the DVC stages
(`garden.stages`) and the tests:

    plan_dynamics(settings) -> DynamicsJob  checks, the series opened, the tensor, the steps, duplicates
    extract_trajectory(job) -> Trajectory   the streaming pass (resumable cache)
    analyse(settings, trajectory, counts) -> Analysis    the metric registry
    evaluate_models(job, ...) -> table, summary, scored    the model-level stages (evaluation=...)
    write_dynamics / write_summary / log_results    tables, figures and the MLflow record

The settings arrive checked and typed (garden.settings.resolve); what can be checked without reading
weights (the folders garden writes to, the tensor, the steps) is checked first, so bad input fails in
seconds with the valid choices, before any training, reading or run creation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import pandas as pd

from garden import cache, families
from garden.analysis import analyse, write_dynamics, write_summary
from garden.errors import GardenError
from garden.evaluation.stage import EvaluationPlan, plan_evaluation
from garden.extract import ExtractionPlan, extract
from garden.layers import ResolvedLayer, resolve_layer
from garden.metrics import MetricResult, step_metrics
from garden.record import (
    Reuse,
    absolute_store,
    describe,
    log_outcome,
    log_results,
    log_training_history,
    record_reuse,
    run_link,
    run_params,
)
from garden.schedule import select_steps
from garden.series import (
    CheckpointSeries,
    DerivedTensors,
    apply_duplicate_policy,
    find_duplicates,
    missing_tensor_error,
)
from garden.settings import Settings
from garden.sources import open_series, source_of
from garden.tasks.registry import register
from garden.tracking import MlflowTracker, with_swept_overrides
from garden.trajectory import Trajectory
from garden.validation import check_environment

log = logging.getLogger("garden")


@dataclass
class RunOutcome:
    run_id: str | None
    run_name: str
    output_dir: Path
    trajectory: Trajectory
    results: dict[str, MetricResult]
    summary: dict[str, float]
    tags: dict[str, str]


def architecture_of(settings: Settings, config: dict | None) -> dict:
    """model.architecture over the series' config.json: what roles and parameter counts need."""
    return {**(config or {}), **(settings.model.architecture or {})}


def resolve_tensor(settings: Settings, series: CheckpointSeries, first_step: int,
                   family: families.Family | None, architecture: dict) -> ResolvedLayer:  # fmt: skip
    """The configured layer in this series: a role in its family, or an exact name; every stored part
    must be in the first step's tensors."""
    layers = architecture.get("num_hidden_layers")
    num_layers = layers if isinstance(layers, int) else series.num_layers(first_step)
    layer = resolve_layer(settings.layer, family, num_layers, architecture)
    names = series.tensor_names(first_step)
    for part in layer.spec.parts:
        if part not in names:
            raise missing_tensor_error(first_step, part, names)
    return layer


def _drop_duplicates(series: CheckpointSeries, plan: ExtractionPlan, policy: str):
    """Apply series.on_duplicate to checkpoints whose weights are byte-identical to an earlier one."""
    duplicates = find_duplicates(series, list(plan.steps), plan.tensor)
    kept = apply_duplicate_policy(list(plan.steps), duplicates, policy)
    if duplicates:
        log.warning(
            "%d duplicated checkpoint(s) (identical weights): %s; series.on_duplicate=%s",
            len(duplicates),
            ", ".join(f"step{d} = step{o}" for d, o in sorted(duplicates.items())),
            policy,
        )
    if len(kept) < 2:
        raise GardenError(f"after excluding duplicated checkpoints only {kept} remain; nothing to analyse")
    return replace(plan, steps=tuple(kept)), duplicates


def _write_fetch_manifest(series, selected, plan, duplicates, folder: Path) -> dict[str, float]:
    """The provenance table of a remote series (every selected step, analysed or excluded) and the
    byte counts logged beside it; nothing for a series on disk."""
    rows = series.fetch_report(selected, plan.tensor)
    if rows is None:
        return {}
    manifest = pd.DataFrame(rows)
    manifest["duplicate_of"] = manifest["step"].map(duplicates)
    manifest["analysed"] = manifest["step"].isin(plan.steps)
    folder.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(folder / "hub_manifest.csv", index=False)
    return {
        "hub_bytes_fetched": float(series.bytes_fetched()),
        "hub_file_bytes": float(manifest.loc[manifest["analysed"], "file_size"].sum()),
    }


def output_folder(settings: Settings) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / settings.model.name / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")


@dataclass
class DynamicsJob:
    """A dynamics job checked, planned and with its series open: everything before the first weight is
    analysed. The CLI runs it in one process; the DVC stages (`garden.stages`) run it piece by piece."""

    settings: Settings
    series: CheckpointSeries
    family: families.Family | None  # None: not known, and not needed (layer.tensor, no stability stage)
    layer: ResolvedLayer
    plan: ExtractionPlan
    selected: list[int]
    duplicates: dict[int, int]
    eval_plan: EvaluationPlan | None
    run_name: str
    tags: dict[str, str]


def plan_dynamics(settings: Settings) -> DynamicsJob:
    """Check and plan the job with its series open, then settle its duplicated steps."""
    return settle_duplicates(open_dynamics(settings))


def open_dynamics(settings: Settings) -> DynamicsJob:
    """Check and plan the job with its series open: nothing trained or fetched yet (except the listing
    of a Hub repository), so bad input fails in seconds, before any run is created."""
    check_environment(settings)
    series = open_series(settings)
    available = series.steps()
    config = series.model_config()  # config.json, read once
    names = lambda: series.tensor_names(available[0])  # noqa: E731  (read only when config.json says nothing)
    family = settings.family or families.detect(config, names)
    layer = resolve_tensor(settings, series, available[0], family, architecture_of(settings, config))
    steps = select_steps(available, settings.steps)
    plan = ExtractionPlan.from_settings(settings.extract, layer.tensor, steps, settings.series.on_bad_step)
    if plan.reference_step not in available:
        raise GardenError(f"extract.reference_step={plan.reference_step} is not a step of the series")
    shape = None if layer.spec.derived else series.tensor_shape(available[0], layer.tensor)
    if shape is not None:  # else checked on the first read, still before any statistics
        plan.resolve_unit_axis(shape)
    eval_plan = plan_evaluation(settings, available)
    if eval_plan is not None and "stability" in eval_plan.stages:
        families.require(family, "evaluation stage stability")
    model = settings.model
    default_name = f"{model.name}/{settings.variant}/{layer.label}"
    run_name = settings.tracking.run_name or with_swept_overrides(default_name)

    if layer.spec.derived:
        series = DerivedTensors(series, layer.spec)
    missing = series.missing_from_cache(list(plan.steps), plan.tensor)
    if missing:
        raise GardenError(
            f"HF_HUB_OFFLINE is set and the cache lacks {plan.tensor} for steps {missing} of "
            f"{series.identity}; run once online, or select the cached steps (steps=list steps.values=[...])"
        )
    caches = [*source_of(settings).caches, "extract", *(["evaluate"] if eval_plan is not None else [])]
    tags = {
        "garden.task": "dynamics",
        "garden.job": run_name,
        "garden.model": model.name,
        "garden.variant": settings.variant,
        "garden.layer": layer.label,
        "garden.tensor": layer.tensor,
        "garden.family": family.name if family else "unknown",
        "garden.series": series.identity,
        "garden.duplicates_policy": settings.series.on_duplicate,
        **cache.version_tags(*caches),
    }
    return DynamicsJob(settings, series, family, layer, plan, list(plan.steps), {}, eval_plan, run_name, tags)


def settle_duplicates(job: DynamicsJob) -> DynamicsJob:
    """Apply series.on_duplicate: this reads content ids (and so trains the tiny series, when it is not
    trained yet)."""
    plan, duplicates = _drop_duplicates(job.series, job.plan, job.settings.series.on_duplicate)
    eval_plan = job.eval_plan
    if eval_plan is not None:
        eval_plan = replace(eval_plan, steps=tuple(s for s in eval_plan.steps if s not in duplicates))
    listed = ", ".join(f"step{d}=step{o}" for d, o in sorted(duplicates.items())) or "none"
    return replace(job, plan=plan, duplicates=duplicates, eval_plan=eval_plan,
                   tags={**job.tags, "garden.duplicates": listed})  # fmt: skip


def used_groups(settings: Settings) -> list[str]:
    """The config groups a dynamics job reads (its MLflow params): the training corpus only for the tiny
    series or a held-out evaluation text, `evaluation` only when a stage runs."""
    groups = ["task", "model", "variant", "layer", "metrics", "steps", "extract", "series", "seed", "device",
              "progress", "figures", "paths", "tracking"]  # fmt: skip
    evaluating = bool(settings.evaluation.stages)
    if evaluating:
        groups.append("evaluation")
    if settings.model.source == "tiny" or (evaluating and settings.evaluation.text.source == "heldout"):
        groups.append("corpus")
    return groups


def extract_trajectory(job: DynamicsJob) -> Trajectory:
    """The streaming pass over the series, resumable through the per-step cache under paths.data_dir."""
    settings = job.settings
    folder = Path(settings.paths.data_dir) / "extract"
    return extract(job.series, job.plan, folder, progress=settings.progress, device=settings.torch_device,
                   prefetch=settings.series.prefetch)  # fmt: skip


def job_summary(job: DynamicsJob, output_dir: Path) -> dict[str, float]:
    """The job's counts (duplicates, Hub bytes), writing the Hub fetch manifest beside the tables."""
    return {
        "n_duplicate_steps": float(len(job.duplicates)),
        **_write_fetch_manifest(job.series, job.selected, job.plan, job.duplicates, output_dir / "tables"),
    }


def live_summary(monitor: dict | None, tags: dict[str, str]) -> dict[str, float]:
    """The live monitor's events beside the offline ones (`live_stationary_step`: dated from,
    `live_stationary_declared_step`: declared at; NaN when not declared), and the step the training
    stopped at (its reason in the tag `garden.stop_reason`)."""
    if not monitor:
        return {}
    summary = {key: value if value >= 0 else math.nan  # the monitor's -1: not declared
               for key, value in monitor["summary"].items() if key.startswith("live_")}  # fmt: skip
    if monitor.get("stop_reason"):
        summary["stopped_step"] = monitor["summary"]["stopped_step"]
        tags["garden.stop_reason"] = monitor["stop_reason"]
    return summary


@contextmanager
def job_run(settings: Settings, run_name: str, tags: dict[str, str], parent_run_id: str | None,
            output_dir: Path, groups: list[str], what: str) -> Iterator[MlflowTracker]:  # fmt: skip
    """A job's MLflow run, opened as soon as its input is checked: the params of the config groups it
    reads, and a description saying it is running (a task's record replaces it at the end)."""
    tracking = settings.tracking
    log.info("opening the MLflow run %s in %s", run_name, absolute_store(tracking.uri))
    tracker = MlflowTracker(tracking.uri, tracking.experiment)
    with tracker.start(run_name, tags, parent_run_id):
        output_dir.mkdir(parents=True, exist_ok=True)
        resolved = {"device": settings.torch_device, "output_dir": output_dir}
        tracker.log_params(run_params(settings, groups, resolved))
        tracker.set_description(f"**Running**: results appear here as it goes.\n\n{run_name}: {what}.")
        link = run_link(tracking.uri, tracking.experiment, tracker.run_id)
        log.info("MLflow run %s is open: it shows the job live%s", tracker.run_id,
                 f" at {link} (under mlflow ui)" if link else "")  # fmt: skip
        yield tracker


def prepare_series(tracker: MlflowTracker, series: CheckpointSeries, reported: set[str]) -> bool | None:
    """Train the tiny series here unless it is trained already (its `train/...` logged live), else log
    the training history it was trained with. Whether it trained in this run (None: a series garden did
    not train)."""
    series.prepare()
    if "train" in reported:
        return True
    history = series.training_history()
    log_training_history(tracker, history)
    return False if history is not None else None


@register("dynamics")
def run_dynamics(settings: Settings, output_dir: Path | None = None,
                 parent_run_id: str | None = None) -> RunOutcome:  # fmt: skip
    """The whole job in one process, in one MLflow run opened as soon as the input is checked: the tiny
    series' training (`train/...`) and the extraction (`extract/...`) show in it live, then the analysis,
    the evaluation and the record."""
    job = open_dynamics(settings)
    output_dir = Path(output_dir) if output_dir is not None else output_folder(settings)
    tracking = settings.tracking
    what = f"the dynamics of {job.layer.tensor} ({job.layer.label}) across {job.series.identity}"
    with job_run(settings, job.run_name, job.tags, parent_run_id, output_dir, used_groups(settings),
                 what) as tracker:  # fmt: skip
        with tracker.live() as reported:
            trained = prepare_series(tracker, job.series, reported)
            if not set(job.selected) <= set(job.series.steps()):  # a training its monitor stopped early
                job = open_dynamics(settings)
            job = settle_duplicates(job)
            tracker.set_tags({"garden.duplicates": job.tags["garden.duplicates"]})
            trajectory = extract_trajectory(job)
        log.info("analysing %s: %d metrics on %d steps, then the tables, figures and the MLflow record",
                 job.layer.tensor, len(settings.metrics.names), len(trajectory.steps))  # fmt: skip
        analysis = analyse(settings, trajectory, job_summary(job, output_dir))
        write_dynamics(output_dir, analysis, job.run_name, settings)
        evaluation = None
        reuse = Reuse({"extracted steps": (trajectory.computed_steps or 0, len(job.plan.steps))}, trained)
        if job.eval_plan is not None:
            evaluation, eval_summary, scored = evaluate_models(
                job, output_dir, analysis.summary, trajectory.meta.get("excluded_steps", {}))
            reuse.parts["evaluated steps"] = (scored, len(evaluation))
            analysis.summary.update(eval_summary)
        tags = {**job.tags, **analysis.tags}
        analysis.summary.update(live_summary(job.series.training_monitor(), tags))
        write_summary(output_dir, job.run_name, analysis.summary, tags)
        previews = log_results(tracker, output_dir, analysis.trajectory.steps, step_metrics(analysis.results),
                               evaluation, analysis.summary, tags, job.series.artifacts())  # fmt: skip
        shown = record_reuse(tracker, job.run_name, reuse, tags)
        tracker.set_description(describe(shown, what, analysis.summary, tags, output_dir, reuse.note(),
                                         (tracker.run_id, previews)))  # fmt: skip
        run_id = tracker.run_id
    log_outcome(shown, analysis.summary, tags, output_dir, run_id, tracking.uri, tracking.experiment, reuse)
    return RunOutcome(run_id, job.run_name, output_dir, trajectory, analysis.results, analysis.summary, tags)


def evaluate_models(job: DynamicsJob, output_dir: Path, dynamics: dict,
                    excluded: Iterable[int] = ()) -> tuple[pd.DataFrame, dict, int]:  # fmt: skip
    """The model-level stages: per-step metrics at their training steps, tables and figures, marked with
    the dynamics' pooled and per-unit bifurcation steps (from its summary); and how many steps were
    scored now (the others came from the cache)."""
    from garden.evaluation.stage import evaluate, summarise
    from garden.figures import draw_evaluation

    settings = job.settings
    excluded = {int(s) for s in excluded}  # steps the extraction excluded (series.on_bad_step)
    eval_plan = replace(job.eval_plan, steps=tuple(s for s in job.eval_plan.steps if s not in excluded))
    result = evaluate(job.series, eval_plan, settings, Path(settings.paths.data_dir) / "evaluate",
                      settings.progress, job.family)  # fmt: skip
    table = result.table
    bifurcation_step = dynamics.get("bifurcation_step")
    summary, layers = summarise(result, settings, bifurcation_step, dynamics.get("unit_bifurcation_step"))
    tables = output_dir / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    table.to_csv(tables / "evaluation.csv", index=False)
    if layers is not None:
        layers.to_csv(tables / "cka_convergence.csv", index=False)
    if settings.figures:
        draw_evaluation(table, layers, result.n_layers, settings.evaluation.cka.threshold, bifurcation_step,
                        settings.model.name, output_dir / "figures",
                        unit_bifurcation_step=dynamics.get("unit_bifurcation_step"))  # fmt: skip
    return table, summary, result.scored
