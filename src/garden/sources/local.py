"""`model.source=local`: a directory of checkpoint folders on disk (`model.path`)."""

from __future__ import annotations

from pathlib import Path

from garden.errors import GardenError
from garden.series import LocalSeries
from garden.settings import Settings
from garden.sources.registry import CONTENT_IDS, register


@register("local")
def open_local(settings: Settings) -> LocalSeries:
    model = settings.model
    if not model.path:
        raise GardenError("model=local needs model.path=<directory holding step{N}/ folders>")
    return LocalSeries(model.path, label=model.name, memo_dir=Path(settings.paths.data_dir) / CONTENT_IDS,
                       family=settings.family, revision_pattern=model.revision_pattern)  # fmt: skip
