"""`model.source=local`: a directory of checkpoint folders on disk (`model.path`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from garden import families
from garden.errors import GardenError
from garden.series import LocalSeries
from garden.sources.registry import CONTENT_IDS, register


@register("local")
def open_local(cfg: DictConfig) -> LocalSeries:
    if not cfg.model.get("path"):
        raise GardenError("model=local needs model.path=<directory holding step{N}/ folders>")
    return LocalSeries(cfg.model.path, label=str(cfg.model.name),
                       memo_dir=Path(cfg.paths.data_dir) / CONTENT_IDS,
                       family=families.configured(cfg.model),
                       revision_pattern=cfg.model.get("revision_pattern"))  # fmt: skip
