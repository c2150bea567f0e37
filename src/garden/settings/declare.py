"""How the schema writes a setting: `setting(default, rule, doc)` and `section(cls)` (dataclass fields
with metadata), the choices several sections share, and the registries whose names some settings take
(read when a setting is checked, so whatever registers is imported by then)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import MISSING, field

from garden.settings.rules import ANYTHING, Rule

VARIANTS = ("standard", "deduped")
BAD_STEP_POLICIES = ("error", "exclude")
DUPLICATE_POLICIES = ("exclude", "keep", "error")
STEP_SELECTIONS = ("all", "eval", "every", "list", "log")
BIFURCATION_CRITERIA = ("bimodality_coefficient", "dip", "ashman_d")
TEXT_SOURCES = ("heldout", "file")
LAMBADA_SOURCES = ("heldout", "file", "hub")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # torch dtypes by name: checkpoints saved, models evaluated
CO_TENSORS = ("W_Q", "W_K", "W_V", "W")
#: What a live monitor may stop a training on (garden.monitor): its two causal events.
STOP_RULES = ("stationary", "unit_bifurcation")


def setting(default: object = MISSING, rule: Rule = ANYTHING, doc: str = "", *, yaml: object = MISSING):
    """A field of the schema: default (none: set by a config group's option), rule and doc; `yaml` is what
    conf/settings.yaml holds instead of the default where that is an interpolation (`${seed}`, an
    environment variable), which the composed config resolves."""
    metadata = {"rule": rule, "doc": doc, "yaml": default if yaml is MISSING else yaml}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)  # type: ignore[call-arg]
    return field(default=default, metadata=metadata)


def section(cls: type, doc: str = "", optional: bool = False):
    """A nested section; `optional` ones may be absent (null) from a config."""
    if optional:
        return field(default=None, metadata={"section": cls, "doc": doc})
    return field(default_factory=cls, metadata={"section": cls, "doc": doc})


def _registered(module: str, registry: str) -> Callable[[], list[str]]:
    """The names a registry holds, read from it when a setting is checked (importing its package then
    imports what registers there)."""

    def names() -> list[str]:
        return list(getattr(importlib.import_module(module), registry))

    return names


_tasks = _registered("garden.tasks.registry", "TASKS")
_sources = _registered("garden.sources.registry", "SOURCES")
_families = _registered("garden.families.base", "FAMILIES")
_metrics = _registered("garden.metrics.registry", "METRICS")
_stages = _registered("garden.evaluation.scorers", "STAGES")
_roles = _registered("garden.families.base", "ROLES")
