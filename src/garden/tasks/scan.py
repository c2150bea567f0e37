"""Task `scan`: every weight tensor of every checkpoint in one pass, mapped role x block x step.

The same core as `dynamics`: the series and steps as it selects them, one `ExtractionPlan` per tensor
(so each record is the one a one-tensor job writes, in the same cache), `extract_scan` for the pass, and
the metric registry on each tensor's trajectory. What is new is the view: one row per tensor
(`tables/scan_summary.csv`), the long per-step table (`tables/scan_steps.parquet`), the heatmaps and the
fork and stationary maps, and a handful of aggregates in MLflow instead of thousands of keys.

    open_scan(settings) -> ScanJob           checks, the series, the selection, the steps, the plans
    scan_tensors(job) -> ScanTables          the pass and the metrics, one tensor's records at a time
    write_scan(folder, summary, steps, ...)  tables, figures and aggregates (compare --scan merges shards
                                             through the same function)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from garden import cache, families, progress
from garden.analysis import analyse, write_summary
from garden.errors import GardenError
from garden.extract import ExtractionPlan
from garden.extract.stream import extract_scan
from garden.record import Reuse, aligned_rows, description, log_files, open_rows, record_reuse
from garden.scan import (
    ScanTensor,
    aggregates,
    block_list,
    fork_rows,
    forks_in_order,
    scan_sentence,
    select_tensors,
    stationary_count,
)
from garden.schedule import select_steps
from garden.series import CheckpointSeries, DerivedTensors, apply_duplicate_policy, find_duplicates
from garden.settings import Settings
from garden.sources import open_series, source_of
from garden.tasks.dynamics import architecture_of, job_run, output_folder, prepare_series, used_groups
from garden.tasks.registry import register
from garden.tracking import with_swept_overrides
from garden.validation import check_environment

log = logging.getLogger("garden")

#: The summary table's leading columns (every other summary value of the metrics follows them).
SUMMARY_COLUMNS = ("role", "block", "tensor", "shape", "units", "bifurcation_step", "unit_bifurcation_step",
                   "final_bimodal_unit_fraction", "stationary_step", "alpha", "final_msd")  # fmt: skip
#: Per-step values that are bookkeeping, not measurements (left out of the long table).
NOT_MEASURED = ("step", "prev_step")


@dataclass
class ScanJob:
    """A scan checked and planned with its series open: nothing read but the listing and headers."""

    settings: Settings
    series: CheckpointSeries
    family: families.Family
    tensors: list[ScanTensor]
    plans: list[ExtractionPlan]
    duplicates: dict[int, int]
    run_name: str
    tags: dict[str, str]


def open_scan(settings: Settings) -> ScanJob:
    """Check the selection against the series' first checkpoint (roles, blocks, globs, unit axes) before
    anything is trained, read or logged."""
    check_environment(settings)
    series = open_series(settings)
    available = series.steps()
    config = series.model_config()
    names = series.tensor_names(available[0])
    family = families.require(settings.family or families.detect(config, lambda: names), "task=scan")
    architecture = architecture_of(settings, config)
    layers = architecture.get("num_hidden_layers")
    num_layers = layers if isinstance(layers, int) else series.num_layers(available[0])
    if not num_layers:
        raise GardenError(
            f"task=scan: cannot tell how many blocks {series.label} has (no config.json, "
            f"no {family.blocks_path}.N. tensors); set model.architecture.num_hidden_layers"
        )
    scan = settings.scan
    blocks = block_list(scan.blocks, num_layers)
    tensors = select_tensors(family, architecture, names, num_layers, None if scan.roles is None else
                             list(scan.roles), blocks, scan.include, scan.exclude)  # fmt: skip
    for tensor in tensors:  # a derived role (q rows of a fused qkv) is read through its stored parts
        if tensor.spec.derived:
            series = DerivedTensors(series, tensor.spec)
    steps = select_steps(available, settings.steps)
    plans = [ExtractionPlan.from_settings(settings.extract, t.name, steps, settings.series.on_bad_step)
             for t in tensors]  # fmt: skip
    if plans[0].reference_step not in available:
        raise GardenError(f"extract.reference_step={plans[0].reference_step} is not a step of the series")
    for plan in plans:
        shape = series.tensor_shape(available[0], plan.tensor)
        if shape is not None:  # (a derived tensor's is known on its first read)
            plan.resolve_unit_axis(shape)
    missing = sorted({s for plan in plans for s in series.missing_from_cache(list(plan.steps), plan.tensor)})
    if missing:
        raise GardenError(f"HF_HUB_OFFLINE is set and the cache lacks steps {missing} of {series.identity}; "
                          "run once online, or select the cached steps")  # fmt: skip
    model = settings.model
    shard = "" if scan.blocks is None else f"/blocks{_blocks_label(scan.blocks)}"
    default_name = f"{model.name}/{settings.variant}/scan{shard}"
    run_name = settings.tracking.run_name or with_swept_overrides(default_name)
    tags = {
        "garden.task": "scan",
        "garden.job": run_name,
        "garden.model": model.name,
        "garden.variant": settings.variant,
        "garden.layer": "scan",
        "garden.family": family.name,
        "garden.series": series.identity,
        "garden.scan_blocks": "all" if blocks is None else ",".join(map(str, blocks)),
        "garden.scan_tensors": str(len(tensors)),
        "garden.duplicates_policy": settings.series.on_duplicate,
        **cache.version_tags(*source_of(settings).caches, "extract"),
    }
    return ScanJob(settings, series, family, tensors, plans, {}, run_name, tags)


def _blocks_label(blocks) -> str:
    return blocks.replace(":", "-") if isinstance(blocks, str) else "-".join(map(str, blocks))


def settle_duplicates(job: ScanJob) -> ScanJob:
    """series.on_duplicate, decided on the first selected tensor (a duplicated checkpoint repeats every
    tensor; `same_checkpoint` compares the whole checkpoints) and applied to all."""
    steps = list(job.plans[0].steps)
    duplicates = find_duplicates(job.series, steps, job.plans[0].tensor)
    kept = apply_duplicate_policy(steps, duplicates, job.settings.series.on_duplicate)
    if duplicates:
        log.warning("%d duplicated checkpoint(s): %s; series.on_duplicate=%s", len(duplicates),
                    ", ".join(f"step{d} = step{o}" for d, o in sorted(duplicates.items())),
                    job.settings.series.on_duplicate)  # fmt: skip
    if len(kept) < 2:
        raise GardenError(f"after excluding duplicated checkpoints only {kept} remain; nothing to analyse")
    plans = [replace(plan, steps=tuple(kept)) for plan in job.plans]
    listed = ", ".join(f"step{d}=step{o}" for d, o in sorted(duplicates.items())) or "none"
    return replace(job, plans=plans, duplicates=duplicates, tags={**job.tags, "garden.duplicates": listed})


@dataclass
class ScanTables:
    summary: pd.DataFrame  # a row per tensor
    steps: pd.DataFrame  # the long table: step, tensor, role, block, metric, value
    computed: int  # records the pass computed; the others came from the cache
    records: int  # records in all (tensors x steps kept)


def scan_tensors(job: ScanJob) -> ScanTables:
    """The pass over the checkpoints, then the metric registry on each tensor's trajectory, one at a
    time."""
    settings = job.settings
    scanned = extract_scan(job.series, job.plans, Path(settings.paths.data_dir) / "extract",
                           progress=settings.progress, device=settings.torch_device,
                           prefetch=settings.series.prefetch)  # fmt: skip
    rows, long_parts = [], []
    log.info("the metrics of %d tensors, one at a time (%d metrics on %d steps each)", len(job.tensors),
             len(settings.metrics.names), len(job.plans[0].steps))  # fmt: skip
    analysing = progress.bar(list(zip(job.tensors, scanned, strict=True)), desc="metrics", unit="tensor",
                             enabled=settings.progress)  # fmt: skip
    for tensor, result in analysing:
        analysis = analyse(settings, result.trajectory(), {})
        trajectory = analysis.trajectory
        units = trajectory.units
        row = {
            "role": tensor.role,
            "block": tensor.block,
            "tensor": tensor.name,
            "shape": "x".join(map(str, trajectory.shape)),
            "units": 0 if units is None else len(units.stats["mean"][0]),
            **{k: v for k, v in analysis.summary.items() if k not in ("n_duplicate_steps",)},
            "excluded_steps": "; ".join(f"step{s}" for s in trajectory.meta.get("excluded_steps", {})),
        }
        rows.append(row)
        measured = {c: trajectory.table[c].to_numpy(dtype=float) for c in trajectory.table.columns
                    if c not in NOT_MEASURED}  # fmt: skip
        measured.update({name: np.asarray(values, dtype=float) for name, values in analysis.per_step.items()})
        long_parts.append(_long(trajectory.steps, tensor, measured))
    summary = pd.DataFrame(rows)
    for column in SUMMARY_COLUMNS:  # an event not reached is a blank cell, not a missing column
        if column not in summary:
            summary[column] = np.nan
    summary = summary[list(SUMMARY_COLUMNS) + [c for c in summary.columns if c not in SUMMARY_COLUMNS]]
    summary["block"] = summary["block"].astype("Int64")
    return ScanTables(summary, pd.concat(long_parts, ignore_index=True), sum(r.computed for r in scanned),
                      sum(len(r.kept) for r in scanned))  # fmt: skip


def _long(steps: np.ndarray, tensor: ScanTensor, measured: dict[str, np.ndarray]) -> pd.DataFrame:
    metrics = list(measured)
    count = len(steps)
    return pd.DataFrame({
        "step": np.tile(np.asarray(steps, dtype=np.int64), len(metrics)),
        "tensor": tensor.name,
        "role": tensor.role,
        "block": pd.array([tensor.block] * count * len(metrics), dtype="Int64"),
        "metric": np.repeat(metrics, count),
        "value": np.concatenate([measured[m] for m in metrics]) if metrics else np.array([]),
    })  # fmt: skip


def write_scan(folder: Path, summary: pd.DataFrame, steps: pd.DataFrame, title: str,
               figures: bool = True) -> dict[str, float]:  # fmt: skip
    """The scan's tables and figures under `folder`, and its aggregates (returned, and in
    `scan_aggregates.json`): what a single scan and a merge of shards (`garden.compare --scan`) write."""
    tables = folder / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    summary.to_csv(tables / "scan_summary.csv", index=False)
    steps.to_parquet(tables / "scan_steps.parquet", index=False)
    values = aggregates(summary)
    if figures:
        from garden.figures import draw_scan

        draw_scan(summary, steps, title, folder / "figures")
    return values


def read_scan_tables(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A scan's two tables as written (`write_scan`)."""
    tables = Path(folder) / "tables"
    summary = pd.read_csv(tables / "scan_summary.csv", dtype={"role": "string"})
    summary["block"] = summary["block"].astype("Int64")
    return summary, pd.read_parquet(tables / "scan_steps.parquet")


def scan_headline(summary: pd.DataFrame, values: dict[str, float]) -> list[tuple[str, str]]:
    """What a finished scan prints: how many tensors fork and settle, which fork first, and where the
    unembedding stands among them."""
    forked, settled = len(forks_in_order(summary)), stationary_count(summary)
    said = f"{len(summary)} scanned; {forked} fork (unit bifurcation), {settled} become stationary"
    rows = [("tensors", said)]
    rows += fork_rows(summary, values)
    return rows


@register("scan")
def run_scan(settings: Settings, output_dir: Path | None = None, parent_run_id: str | None = None) -> dict:
    """The whole scan in one MLflow run: the tiny series' training (when it must), the pass (its progress
    live as `extract/...`), the metrics per tensor, the tables, figures and aggregates."""
    job = open_scan(settings)
    output_dir = Path(output_dir) if output_dir is not None else output_folder(settings)
    tracking = settings.tracking
    what = f"a scan of {len(job.tensors)} tensors across {job.series.identity}"
    groups = [g for g in used_groups(settings) if g != "layer"] + ["scan"]
    with job_run(settings, job.run_name, job.tags, parent_run_id, output_dir, groups, what) as tracker:
        with tracker.live() as reported:
            trained = prepare_series(tracker, job.series, reported)
            if not set(job.plans[0].steps) <= set(job.series.steps()):  # a training stopped early
                job = open_scan(settings)
            job = settle_duplicates(job)
            tracker.set_tags({"garden.duplicates": job.tags["garden.duplicates"]})
            tables = scan_tensors(job)
        summary = tables.summary
        values = write_scan(output_dir, summary, tables.steps, job.run_name, settings.figures)
        values["n_duplicate_steps"] = float(len(job.duplicates))
        write_summary(output_dir, job.run_name, values, job.tags)
        previews = log_files(tracker, output_dir, values, job.tags, ("scan_fork_map", "scan_stationary_map"))
        reuse = Reuse({"tensor-step records": (tables.computed, tables.records)}, trained)
        shown = record_reuse(tracker, job.run_name, reuse, job.tags)
        rows = scan_headline(summary, values)
        tracker.set_description(description(scan_sentence(summary), shown, what, rows, output_dir,
                                            reuse.note(),
                                            (tracker.run_id, previews)))  # fmt: skip
        run_id = tracker.run_id
    rows += [("cache", reuse.line()),
             ("results", f"{output_dir} (tables/scan_summary.csv, tables/scan_steps.parquet, figures/)"),
             ("MLflow run", f"{run_id} in experiment {tracking.experiment}"),
             *open_rows(tracking.uri, tracking.experiment, run_id)]  # fmt: skip
    log.info("%s finished:\n%s", shown, aligned_rows(rows))
    return {"run_id": run_id, "output_dir": output_dir, "summary": summary, "aggregates": values}
