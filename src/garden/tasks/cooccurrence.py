"""Task `cooccurrence`: paper 003 (arXiv 2410.09605). Train its one-layer model on the synthetic task
(logged as its own run), then analyse the saved snapshots like any series with task `dynamics`."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, open_dict

from garden import cache
from garden.errors import GardenError
from garden.record import SUMMARY, aligned_rows, markdown_rows, run_params
from garden.tasks.dynamics import RunOutcome, output_folder, run_dynamics
from garden.tasks.registry import register
from garden.tracking import MlflowTracker, with_swept_overrides
from garden.validation import check_config, check_environment

log = logging.getLogger("garden")


@register("cooccurrence")
def run_cooccurrence(cfg: DictConfig, output_dir: Path | None = None) -> RunOutcome | None:
    """Train paper 003's model (logged as its own run), then analyse its snapshots like any series."""
    from garden import cooccurrence

    co = cfg.cooccurrence
    cooccurrence.validate(co)
    check_environment(cfg)
    series_dir = Path(cfg.paths.data_dir) / "series" / f"cooccurrence-{cooccurrence.run_config_hash(co)}"
    tensor = co.get("analyse_tensor")
    analysis = None
    if tensor:  # the follow-up analysis is checked before training, like any bad input
        if tensor not in cooccurrence.PARAMETERS:
            raise GardenError(
                f"cooccurrence.analyse_tensor={tensor!r} is not a snapshot tensor; "
                f"valid: {', '.join(cooccurrence.PARAMETERS)} (or null)"
            )
        analysis = cfg.copy()
        with open_dict(analysis):
            analysis.task = "dynamics"
            analysis.model = {"name": "cooccurrence", "source": "local", "variants": ["standard"],
                              "path": str(series_dir)}  # fmt: skip
            analysis.layer.tensor = str(tensor)
            analysis.evaluation.stages = []
        check_config(analysis)
    output_dir = Path(output_dir) if output_dir is not None else output_folder(cfg)
    tracker = MlflowTracker(str(cfg.tracking.uri), str(cfg.tracking.experiment))
    tags = {
        "garden.model": "cooccurrence",
        "garden.task": "cooccurrence",
        "garden.snapshots": str(series_dir),
        **cache.version_tags("cooccurrence"),
    }
    run_name = with_swept_overrides("cooccurrence/standard/train")
    with tracker.start(run_name, tags):
        resolved = {"device": "cpu", "output_dir": output_dir}  # paper 003's model is tiny: CPU always
        tracker.log_params(run_params(cfg, TRAIN_GROUPS, resolved))
        tracker.set_description(f"**{run_name}**: paper 003 (arXiv 2410.09605), training. Running.")
        record = cooccurrence.train(co, series_dir, progress=bool(cfg.progress))
        table = record.table
        tracker.log_table(table, "epoch", prefix="train/")
        tracker.log_summary({f"{SUMMARY}{key}": value for key, value in record.summary.items()})
        (output_dir / "tables").mkdir(parents=True, exist_ok=True)
        table.to_csv(output_dir / "tables" / "cooccurrence.csv", index=False)
        if cfg.get("figures", True):
            from garden.figures import draw_cooccurrence

            draw_cooccurrence(table, record.summary, output_dir / "figures")
        tracker.log_artifacts(output_dir / "tables", "tables")
        tracker.log_artifacts(output_dir / "figures", "figures")
        rows = outcome_rows(record.summary, int(co.epochs))
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
