"""The source registry: `model.source` names where a series' checkpoints come from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from garden.registry import Registry
from garden.series import CheckpointSeries

#: Under paths.data_dir: the remembered content hashes of local series' files (see garden.cache).
CONTENT_IDS = "content-ids"


@dataclass(frozen=True)
class Source:
    name: str
    open: Callable[..., CheckpointSeries]  # Settings -> the series
    #: The keyed caches (garden.cache kinds) reads from this source fill; their code versions are tagged.
    caches: tuple[str, ...] = ()


SOURCES: Registry[Source] = Registry("source", "model.source")


def register(name: str, caches: tuple[str, ...] = ()):
    """Register a function opening the series a job's Settings name as source `name`."""
    return SOURCES.register(name, lambda opener: Source(name, opener, caches))
