"""A job's settings, read once: the composed Hydra config through the schema (garden.settings.schema)
into typed `Settings`, every rule and relation checked, the device and the family resolved.

Everything after `resolve` takes `Settings`, not the raw config: the stage functions, the sources, the
evaluation, the tiny trainer, the MLflow params (every setting of the groups a task reads).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from garden.errors import GardenError
from garden.settings.rules import Rule
from garden.settings.schema import (
    RELATIONS,
    CkaSettings,
    CooccurrenceSettings,
    CorpusSettings,
    EvaluationSettings,
    ExtractSettings,
    GardenConfig,
    LambadaSettings,
    LayerSettings,
    MetricSettings,
    ModelSettings,
    PathSettings,
    SeriesSettings,
    StepSettings,
    StudySettings,
    TextSettings,
    TinyArchitecture,
    TinyTraining,
    TrackingSettings,
)

__all__ = ["CkaSettings", "CooccurrenceSettings", "CorpusSettings", "EvaluationSettings", "ExtractSettings",
           "GardenConfig", "LambadaSettings", "LayerSettings", "MetricSettings", "ModelSettings",
           "PathSettings", "SeriesSettings", "Settings", "StepSettings", "StudySettings", "TextSettings",
           "TinyArchitecture", "TinyTraining", "TrackingSettings", "as_plain", "from_values",
           "read_section", "resolve"]  # fmt: skip

@dataclass(frozen=True, kw_only=True)
class Settings(GardenConfig):
    """The checked settings of one job, and what they resolve to."""

    torch_device: torch.device  # `device` resolved: auto is cuda when present
    evaluation_device: torch.device  # `evaluation.device` resolved (the models of the evaluation stages)
    family: Any = None  # the Family `model.family` names (None: detected from the series, or not needed)


def _invalid(key: str, value: object, valid: str, why: str = "") -> GardenError:
    return GardenError(f"{key}={value!r} is not valid{f' ({why})' if why else ''}; valid: {valid}")


def _checked(key: str, value: object, rule: Rule) -> object:
    if not rule.allows(value):
        raise _invalid(key, value, rule.describe, rule.explain(value) if rule.explain else "")
    return None if value is None else rule.convert(value)


def read_section(cls: type, values: object, prefix: str = "", strict: bool = True) -> Any:
    """An instance of a schema dataclass from plain values: every rule checked (errors name the dotted
    key, the value and what is valid), absent settings at their default, unknown ones refused."""
    if not isinstance(values, dict):
        raise _invalid(prefix.rstrip(".") or "config", values, "a section of settings")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if strict and unknown:
        raise GardenError(f"{prefix}{unknown[0]} is not a setting garden knows; valid in "
                          f"{prefix.rstrip('.') or 'the config'}: {', '.join(known)}")  # fmt: skip
    kwargs: dict[str, object] = {}
    for name, spec in known.items():
        key = f"{prefix}{name}"
        nested = spec.metadata.get("section")
        if nested is not None:
            raw = values.get(name)
            if raw is None and spec.default is None:  # an optional section that is absent
                continue
            kwargs[name] = read_section(nested, {} if raw is None else raw, key + ".")
        elif name in values:
            kwargs[name] = _checked(key, values[name], spec.metadata["rule"])
        elif spec.default is MISSING and spec.default_factory is MISSING:
            raise GardenError(f"{key} is not set; valid: {spec.metadata['rule'].describe}")
    return cls(**kwargs)


def _relations(config: GardenConfig) -> None:
    if config.model.source == "tiny" and config.model.architecture:
        read_section(TinyArchitecture, config.model.architecture, "model.architecture.", strict=False)
    for relation in RELATIONS:
        failed = relation(config)
        if failed is not None:
            raise _invalid(*failed)


def plain_values(cfg: DictConfig | dict) -> dict:
    """The composed config as plain values, interpolations resolved, Hydra's own node left out."""
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    values.pop("hydra", None)
    return values


def from_values(values: dict) -> GardenConfig:
    """The checked schema values of a config (no device or family resolved: what a test or a tool that
    only reads settings needs)."""
    config = read_section(GardenConfig, values)
    _relations(config)
    return config


def resolve(cfg: DictConfig | dict) -> Settings:
    """The job's Settings: every rule and relation of the schema, then the device and the family. Bad
    input fails here, in a second, naming the setting and what is valid."""
    from garden.devices import resolve_device
    from garden.families.base import FAMILIES

    config = from_values(plain_values(cfg))
    family = None if config.model.family is None else FAMILIES.resolve(config.model.family)
    values = {f.name: getattr(config, f.name) for f in fields(GardenConfig)}
    device = resolve_device(config.device)
    evaluation_device = resolve_device(config.evaluation.device) if config.evaluation.stages else device
    return Settings(**values, torch_device=device, evaluation_device=evaluation_device, family=family)


def as_plain(value: object) -> object:
    """A settings value as plain JSON-able data (dataclasses as dicts, tuples as lists)."""
    if is_dataclass(value):
        return {f.name: as_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple | list):
        return [as_plain(v) for v in value]
    return value
