"""Task `cooccurrence`: paper 003 (arXiv 2410.09605). Train its one-layer model on the synthetic task
(logged as its own run), then analyse the saved snapshots like any series with task `dynamics`."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, open_dict

from garden import cache
from garden.errors import GardenError
from garden.tasks import register
from garden.tasks.dynamics import RunOutcome, output_folder, run_dynamics
from garden.tracking import MlflowTracker, flatten
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
    with tracker.start("cooccurrence/standard/train", tags):
        tracker.log_params(flatten(cfg))
        record = cooccurrence.train(co, series_dir, progress=bool(cfg.progress))
        table = record.table
        tracker.log_table(table, "epoch")
        tracker.log_summary(record.summary)
        (output_dir / "tables").mkdir(parents=True, exist_ok=True)
        table.to_csv(output_dir / "tables" / "cooccurrence.csv", index=False)
        if cfg.get("figures", True):
            cooccurrence.draw(table, record.summary, output_dir / "figures")
        tracker.log_artifacts(output_dir / "tables", "tables")
        tracker.log_artifacts(output_dir / "figures", "figures")
    log.info("cooccurrence: %s; snapshots in %s", record.summary, series_dir)
    return None if analysis is None else run_dynamics(analysis, output_dir / "dynamics")
