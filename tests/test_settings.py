"""One definition per setting (garden.settings.schema): the YAML defaults and the settings page follow
from it, every option of every config group reads through it, and no range rule lives anywhere else."""

from __future__ import annotations

import ast
import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from garden.config import config_dir
from garden.errors import GardenError
from garden.settings import GardenConfig, TinyArchitecture, TinyTraining, from_values, plain_values, resolve
from garden.settings.render import settings_markdown, settings_yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "garden"


def test_the_yaml_defaults_and_the_settings_page_are_generated_from_the_schema():
    """`make settings` writes them; a schema edit without it fails here."""
    assert (ROOT / "conf" / "settings.yaml").read_text() == settings_yaml()
    assert (ROOT / "docs" / "settings.md").read_text() == settings_markdown()


def _leaves(cls: type, prefix: str = ""):
    for spec in fields(cls):
        nested = spec.metadata.get("section")
        if nested is not None:
            yield from _leaves(nested, f"{prefix}{spec.name}.")
        else:
            yield f"{prefix}{spec.name}", spec


@pytest.mark.parametrize("cls", [GardenConfig, TinyArchitecture, TinyTraining])
def test_every_setting_says_what_is_valid_and_what_it_does(cls):
    for key, spec in _leaves(cls):
        rule = spec.metadata["rule"]
        assert rule.describe and spec.metadata["doc"], key
        assert re.match(r"(an integer|a number|one of|true|a |an |auto|null)", rule.describe), key


def test_every_option_of_every_group_reads_through_the_schema():
    """An option with a key the schema does not know, or a value it refuses, fails here (each option
    composed on the defaults, and the study's config once)."""
    groups = [p for p in config_dir().iterdir() if p.is_dir()]
    options = [f"{group.name}={option.stem}" for group in groups for option in sorted(group.glob("*.yaml"))]
    assert len(options) > 40
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        for option in options:
            config = from_values(plain_values(compose("config", overrides=[option])))
            assert config.model.name, option
        study = from_values(plain_values(compose("study")))
    assert study.study is not None and study.paths.data_dir == "study"


def test_a_key_the_schema_does_not_know_is_named_with_the_valid_ones(compose_config):
    values = plain_values(compose_config())
    values["extract"]["subsampel"] = 5
    with pytest.raises(GardenError, match=r"extract.subsampel is not a setting garden knows; valid in "
                                          r"extract: subsample, n_trajectories"):  # fmt: skip
        from_values(values)


@pytest.mark.parametrize(
    "override, message",
    [  # the places where two copies of a rule disagreed before the schema
        ("extract.subsample=1", r"extract.subsample=1 is not valid; valid: an integer >= 2 or null"),
        ("extract.n_trajectories=-1", r"extract.n_trajectories=-1 is not valid; valid: an integer >= 0"),
        ("extract.quantiles=[0.0,0.5]", r"extract.quantiles=\[0.0, 0.5\] is not valid; valid: a list of num"),
        ("series.on_duplicate=drop", r"series.on_duplicate='drop' is not valid; valid: one of exclude, keep"),
        ("metrics.names=[]", r"metrics.names=\[\] is not valid \(fewer than 1\); valid: a list of at least"),
        ("device=tpu", r"device='tpu' is not valid; valid: auto, cpu, cuda or cuda:N"),
        ("cooccurrence.L=2", r"cooccurrence.L=2 is not valid; valid: an integer >= 3"),
    ],
)
def test_each_rule_is_the_schemas_one(compose_settings, override, message):
    with pytest.raises(GardenError, match=message):
        compose_settings(override)


#: Checks outside the schema that say what is valid: they depend on the series or the disk (a tensor's
#: shape, the steps a series has), or are the writable-folder probes; registry.py is the generic lookup
#: of a name (the schema's rule for it reads the same registry).
DATA_DEPENDENT = {
    "extract/plan.py": ("valid for this tensor", "too few for a dip test"),
    "schedule.py": ("dynamics need at least two checkpoints",),
    "validation.py": ("is not writable", "does not exist", "cannot be opened for writing"),
}
SKIPPED = ("settings/", "registry.py")


def _messages(path: Path) -> list[str]:
    """The literal text of every GardenError(...) built in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "GardenError" and node.args:
            parts = [n.value for n in ast.walk(node.args[0]) if isinstance(n, ast.Constant)]
            found.append("".join(str(p) for p in parts))
    return found


def test_no_range_rule_lives_outside_the_schema():
    """A message saying what is valid for a setting is the schema's (garden/settings/), unless it
    depends on the series or the disk (DATA_DEPENDENT); so a setting's range is written once."""
    offenders = []
    for path in sorted(SOURCE.rglob("*.py")):
        relative = path.relative_to(SOURCE).as_posix()
        if relative.startswith(SKIPPED):
            continue
        allowed = DATA_DEPENDENT.get(relative, ())
        for message in _messages(path):
            states_a_range = re.search(r"is not valid|must be|valid:|at least|at most|positive", message)
            if states_a_range and not any(phrase in message for phrase in allowed):
                offenders.append(f"{relative}: {message[:90]}")
    assert not offenders, "\n".join(offenders)


def test_the_device_and_the_family_are_resolved_once_per_job(compose_config, monkeypatch, tmp_path):
    from garden import devices
    from garden.families.base import FAMILIES
    from garden.tasks.dynamics import open_dynamics

    calls = {"device": 0, "family": 0}
    resolve_device, lookup = devices.resolve_device, FAMILIES.resolve

    def counted_device(name):
        calls["device"] += 1
        return resolve_device(name)

    def counted_family(name):
        calls["family"] += 1
        return lookup(name)

    monkeypatch.setattr(devices, "resolve_device", counted_device)
    monkeypatch.setattr(FAMILIES, "resolve", counted_family)
    settings = resolve(compose_config(f"paths.data_dir={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/m.db"))
    open_dynamics(settings)  # everything before the first weight is read
    assert calls == {"device": 1, "family": 1}
    assert settings.family.name == "gpt_neox" and settings.torch_device.type in ("cpu", "cuda")


def test_every_schema_default_reaches_the_composed_config(compose_config):
    """What the YAML defaults hold is what the dataclasses default to (interpolations resolved)."""
    config = from_values(plain_values(compose_config()))
    for key, spec in _leaves(GardenConfig):
        if spec.default is MISSING or key.startswith(("model.", "layer.", "corpus.", "steps.select")):
            continue  # set by the groups' options
        if "yaml" in spec.metadata and spec.metadata["yaml"] != spec.default:
            continue  # an interpolation (${seed}, an environment variable)
        section, _, name = key.rpartition(".")
        holder = config
        for part in filter(None, section.split(".")):
            holder = getattr(holder, part)
        value = getattr(holder, name)
        expected = tuple(spec.default) if isinstance(spec.default, list) else spec.default
        if key.startswith("evaluation.steps."):
            continue  # evaluation.steps defaults to the eval subset (its section's own default)
        assert value == expected, key
