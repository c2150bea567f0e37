"""Checkpoint sources, registered by name: `model.source` picks one and `open_series(cfg)` opens it.

A source turns a model config into a `CheckpointSeries` whose steps and tensor names are known before
any expensive work: the tiny series trains on its first read, the Hub lists its branches, a folder on
disk is listed. A new source is one module here (a function decorated with `@register` from
`garden.sources.registry`, imported below) and one `conf/model/` config naming it in `source:`.
"""

from __future__ import annotations

from garden.series import CheckpointSeries
from garden.settings import Settings
from garden.sources import hub, local, tiny  # noqa: F401  (they register the sources)
from garden.sources.registry import CONTENT_IDS, SOURCES, Source, register

__all__ = ["CONTENT_IDS", "SOURCES", "Source", "open_series", "register", "source_of"]


def source_of(settings: Settings) -> Source:
    return SOURCES.resolve(settings.model.source)


def open_series(settings: Settings) -> CheckpointSeries:
    """The series `model.source` names, opened as cheaply as it can be (nothing trained or fetched)."""
    return source_of(settings).open(settings)
