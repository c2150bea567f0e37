"""Task `cooccurrence`: paper 003 (arXiv 2410.09605). Train its one-layer model on the synthetic task
(logged as its own run), then analyse the saved snapshots like any series with task `dynamics`."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from garden import cache
from garden.record import SUMMARY, aligned_rows, markdown_rows, run_params
from garden.settings import ModelSettings, Settings
from garden.tasks.dynamics import RunOutcome, output_folder, run_dynamics
from garden.tasks.registry import register
from garden.tracking import MlflowTracker, with_swept_overrides
from garden.validation import check_environment

log = logging.getLogger("garden")


def analysis_settings(settings: Settings, series_dir: Path) -> Settings:
    """The follow-up dynamics job: the snapshots of `cooccurrence.analyse_tensor` as a local series."""
    model = ModelSettings(name="cooccurrence", source="local", variants=("standard",), path=str(series_dir))
    layer = replace(settings.layer, tensor=settings.cooccurrence.analyse_tensor)
    evaluation = replace(settings.evaluation, stages=())
    return replace(settings, task="dynamics", variant="standard", model=model, layer=layer,
                   evaluation=evaluation, family=None)  # fmt: skip


@register("cooccurrence")
def run_cooccurrence(settings: Settings, output_dir: Path | None = None) -> RunOutcome | None:
    """Train paper 003's model (logged as its own run), then analyse its snapshots like any series."""
    from garden import cooccurrence

    co = settings.cooccurrence
    cooccurrence.make_dataset(co.n, co.L, co.d, 0)  # the task's shape, checked before anything is logged
    check_environment(settings)
    series_dir = Path(settings.paths.data_dir) / "series" / f"cooccurrence-{cooccurrence.run_config_hash(co)}"
    analysis = analysis_settings(settings, series_dir) if co.analyse_tensor else None
    output_dir = Path(output_dir) if output_dir is not None else output_folder(settings)
    tracker = MlflowTracker(settings.tracking.uri, settings.tracking.experiment)
    tags = {
        "garden.model": "cooccurrence",
        "garden.task": "cooccurrence",
        "garden.snapshots": str(series_dir),
        **cache.version_tags("cooccurrence"),
    }
    run_name = with_swept_overrides("cooccurrence/standard/train")
    with tracker.start(run_name, tags):
        resolved = {"device": "cpu", "output_dir": output_dir}  # paper 003's model is tiny: CPU always
        tracker.log_params(run_params(settings, TRAIN_GROUPS, resolved))
        tracker.set_description(f"**{run_name}**: paper 003 (arXiv 2410.09605), training. Running.")
        record = cooccurrence.train(co, series_dir, progress=settings.progress)
        table = record.table
        tracker.log_table(table, "epoch", prefix="train/")
        tracker.log_summary({f"{SUMMARY}{key}": value for key, value in record.summary.items()})
        (output_dir / "tables").mkdir(parents=True, exist_ok=True)
        table.to_csv(output_dir / "tables" / "cooccurrence.csv", index=False)
        if settings.figures:
            from garden.figures import draw_cooccurrence

            draw_cooccurrence(table, record.summary, output_dir / "figures")
        tracker.log_artifacts(output_dir / "tables", "tables")
        tracker.log_artifacts(output_dir / "figures", "figures")
        rows = outcome_rows(record.summary, co.epochs)
        tracker.set_description("\n".join([
            f"**{run_name}**: paper 003 (arXiv 2410.09605), the one-layer transformer trained on the "
            "word co-occurrence task; its snapshots are analysed in the child run.",
            "", *markdown_rows(rows),
        ]))  # fmt: skip
        parent_id = tracker.run_id
    log.info("%s finished (MLflow run %s):\n%s", run_name, parent_id,
             aligned_rows([*rows, ("snapshots", str(series_dir))]))  # fmt: skip
    if analysis is None:
        return None
    return run_dynamics(analysis, output_dir / "dynamics", parent_run_id=parent_id)


#: The config groups paper 003's training reads (its run's params).
TRAIN_GROUPS = ["task", "cooccurrence", "seed", "progress", "figures", "paths", "tracking"]


def outcome_rows(summary: dict, epochs: int) -> list[tuple[str, str]]:
    """Paper 003's headline: the two phases and where the attention starts to move."""

    def epoch(key: str) -> str:
        value = summary.get(key)
        return f"epoch {value:g}" if value is not None else f"not within {epochs} epochs"

    return [
        ("phase 1 ends (all correct)", epoch("phase1_end_epoch")),
        ("attention starts to move", epoch("attention_move_epoch")),
        ("final loss", f"{summary['final_loss']:.3g}"),
        ("final accuracy", f"{summary['final_accuracy']:.3f}"),
    ]
