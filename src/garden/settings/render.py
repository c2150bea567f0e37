"""What follows from the schema: conf/settings.yaml (the defaults Hydra and DVC compose) and
docs/settings.md (every setting, its default, what is valid, what it does). Both are generated
(`python -m garden.settings yaml|docs`, or `make settings`) and a test keeps them current."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from dataclasses import MISSING, fields
from pathlib import Path

from garden.settings.schema import GardenConfig

YAML_HEADER = """\
# garden's settings and their defaults, generated from the schema in garden/settings/ (the one place each
# setting's type, default and valid values are written): `make settings` rewrites this file, a test keeps
# it current. config.yaml composes it first; the config groups' options (model=, layer=, steps=, ...)
# then set what they choose. Every setting with what is valid: docs/settings.md.
"""


def _scalar(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        plain = value and not any(c in value for c in ":#{}[],&*!|>'\"%@`") and value.strip() == value
        return value if plain and value.lower() not in ("null", "true", "false", "yes", "no") else json.dumps(
            value
        )
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    return repr(value)


def _comment(doc: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(doc, 106 - len(indent))] if doc else []


def _default_of(spec, instance: object = None) -> object:
    """What the YAML holds: an interpolation where the schema gives one, else the default (the enclosing
    section's own default where it has one: evaluation.steps selects eval)."""
    written = spec.metadata.get("yaml", spec.default)
    if instance is not None and written == spec.default:
        return getattr(instance, spec.name)
    if written is not MISSING:
        return written
    return spec.default_factory()


def _has_default(spec) -> bool:
    return not (spec.default is MISSING and spec.default_factory is MISSING)


def _section_default(spec) -> object:
    """The default instance of a section (None where its settings come from a group's option)."""
    try:
        return spec.default_factory()
    except TypeError:
        return None


def _yaml_value(key: str, value: object, indent: str) -> list[str]:
    line = f"{indent}{key}: {_scalar(value)}"
    if len(line) <= 110 or not isinstance(value, list | tuple):
        return [line]
    return textwrap.wrap(line, 110, subsequent_indent=indent + "  ", break_long_words=False)


def yaml_lines(cls: type = GardenConfig, depth: int = 0, instance: object = None) -> Iterator[str]:
    """The YAML of a schema class's defaults, each key under its doc as a comment; settings without a
    default (a group's option sets them) and optional sections are left out."""
    indent = "  " * depth
    for spec in fields(cls):
        nested = spec.metadata.get("section")
        doc = spec.metadata.get("doc", "")
        if nested is not None:
            if spec.default is None:
                continue
            body = list(yaml_lines(nested, depth + 1, _section_default(spec)))
            if body:
                if depth == 0:
                    yield ""
                yield from _comment(doc, indent)
                yield f"{indent}{spec.name}:"
                yield from body
            continue
        if not _has_default(spec):
            continue
        yield from _comment(doc, indent)
        yield from _yaml_value(spec.name, _default_of(spec, instance), indent)


def settings_yaml() -> str:
    return YAML_HEADER + "\n" + "\n".join(yaml_lines()).rstrip() + "\n"


def _rows(cls: type, prefix: str = "", instance: object = None) -> Iterator[tuple[str, str, str, str]]:
    for spec in fields(cls):
        nested = spec.metadata.get("section")
        if nested is not None:
            yield from _rows(nested, f"{prefix}{spec.name}.", _section_default(spec) if _has_default(spec)
                             else None)  # fmt: skip
            continue
        default = "(the group's option)"
        if _has_default(spec):
            default = f"`{_scalar(_default_of(spec, instance))}`"
        rule = spec.metadata["rule"]
        yield f"`{prefix}{spec.name}`", default, rule.describe, spec.metadata.get("doc", "")


def settings_markdown() -> str:
    lines = [
        "# garden's settings",
        "",
        "Generated from the schema in `src/garden/settings/` (`make settings`): each setting is defined",
        "there once.",
        "Set any of them as `key=value` on the command line (`python -m garden extract.unit_sample=2048`).",
        "`model.architecture.*` and `model.train.*` are checked for the tiny series as TinyArchitecture and",
        "TinyTraining; relations between settings (a multiple of, at most, above) are checked after these.",
        "",
        "| setting | default | valid | what it does |",
        "|---|---|---|---|",
    ]
    for key, default, valid, doc in _rows(GardenConfig):
        lines.append(f"| {key} | {default} | {valid.replace('|', '/')} | {doc.replace('|', '/')} |")
    from garden.settings.schema import TinyArchitecture, TinyTraining

    for cls, prefix in ((TinyArchitecture, "model.architecture."), (TinyTraining, "model.train.")):
        for key, default, valid, doc in _rows(cls, prefix):
            if key.startswith("`model.train."):
                continue  # listed above (model.train is a schema section)
            lines.append(f"| {key} | {default} | {valid} | {doc} |")
    return "\n".join(lines) + "\n"


def write(kind: str, root: Path) -> Path:
    path = root / ("conf/settings.yaml" if kind == "yaml" else "docs/settings.md")
    path.write_text(settings_yaml() if kind == "yaml" else settings_markdown())
    return path
