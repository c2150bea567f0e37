"""Checkpoint sources, registered by name: `model.source` picks one and `open_series(cfg)` opens it.

A source turns a model config into a `CheckpointSeries` whose steps and tensor names are known before
any expensive work: the tiny series trains on its first read, the Hub lists its branches, a folder on
disk is listed. A new source is one module here (a function decorated with `@register`, imported below)
and one `conf/model/` config naming it in `source:`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig

from garden.errors import GardenError
from garden.series import CheckpointSeries

#: Under paths.data_dir: the remembered content hashes of local series' files (see garden.cache).
CONTENT_IDS = "content-ids"


@dataclass(frozen=True)
class Source:
    name: str
    open: Callable[[DictConfig], CheckpointSeries]
    #: The keyed caches (garden.cache kinds) reads from this source fill; their code versions are tagged.
    caches: tuple[str, ...] = ()


SOURCES: dict[str, Source] = {}


def register(name: str, caches: tuple[str, ...] = ()):
    def decorate(opener: Callable[[DictConfig], CheckpointSeries]):
        SOURCES[name] = Source(name, opener, caches)
        return opener

    return decorate


def source_of(cfg: DictConfig) -> Source:
    name = cfg.model.get("source")
    try:
        return SOURCES[str(name)]
    except KeyError:
        valid = ", ".join(SOURCES)
        raise GardenError(f"model.source={name!r} is not a known source; valid: {valid}") from None


def open_series(cfg: DictConfig) -> CheckpointSeries:
    """The series `model.source` names, opened as cheaply as it can be (nothing trained or fetched)."""
    return source_of(cfg).open(cfg)


from garden.sources import hub, local, tiny  # noqa: E402,F401  (registers the sources)
