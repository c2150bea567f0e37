"""Hydra compose tests of every config group, from the repository's conf/ tree."""

from pathlib import Path

import pytest
from hydra.errors import MissingConfigException

from garden import families
from garden.config import config_dir
from garden.layers import resolve_layer

GROUPS = {
    "model": ["tiny", "local"]
    + [
        f"pythia-{size}"
        for size in ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
    ]
    + [f"olmo2-{size}" for size in ("1b", "7b", "13b", "32b")],
    "layer": list(families.ROLES),  # every role is a layer option, valid for every family
    "metrics": ["forking_paths", "minimal"],
    "steps": ["all", "eval", "every", "list", "log"],
    "tracking": ["mlflow"],
    "corpus": ["shakespeare"],
}


def test_config_tree_is_found_and_complete():
    root = config_dir()
    assert (root / "config.yaml").is_file()
    for group, options in GROUPS.items():
        assert sorted(p.stem for p in (root / group).glob("*.yaml")) == sorted(options), group


def test_defaults(compose_config):
    cfg = compose_config()
    assert cfg.model.name == "tiny" and cfg.layer.name == "unembedding" and cfg.steps.select == "all"
    assert cfg.layer.role == "unembedding" and cfg.model.family == "gpt_neox"
    assert cfg.tracking.experiment == "garden"
    assert cfg.metrics.bifurcation_criterion == "bimodality_coefficient"
    assert cfg.variant == "standard"


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(compose_config, group, option):
    cfg = compose_config(f"{group}={option}")
    assert cfg[group] is not None


def test_block_layers_take_an_index(compose_config):
    cfg = compose_config("layer=mlp_out", "layer.index=3")
    resolved = resolve_layer(cfg.layer, families.get(cfg.model.family), 4)
    assert resolved.tensor == "gpt_neox.layers.3.mlp.dense_4h_to_h.weight"
    olmo = compose_config("model=olmo2-1b", "layer=mlp_out", "layer.index=3")
    resolved = resolve_layer(olmo.layer, families.get(olmo.model.family), 16)
    assert resolved.tensor == "model.layers.3.mlp.down_proj.weight"
    cfg = compose_config("layer.tensor=gpt_neox.embed_in.weight")
    assert cfg.layer.tensor == "gpt_neox.embed_in.weight"


def test_minimal_metrics_inherit_the_thresholds(compose_config):
    cfg = compose_config("metrics=minimal")
    assert "dip" not in cfg.metrics.names and cfg.metrics.stationary_threshold == 0.05


def test_tracking_uri_follows_the_environment(compose_config, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert compose_config().tracking.uri == "sqlite:///elsewhere.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert compose_config().tracking.uri == "sqlite:///mlflow.db"


@pytest.mark.parametrize("override", ["model=gpt5", "layer=attention", "metrics=everything", "steps=some"])
def test_unknown_choices_list_the_valid_ones(compose_config, override):
    group = override.split("=")[0]
    with pytest.raises(MissingConfigException) as err:
        compose_config(override)
    message = str(err.value)
    assert f"Available options in '{group}'" in message
    assert all(f"\t{option}" in message for option in GROUPS[group])


@pytest.mark.slow
def test_built_wheel_carries_the_config_tree(tmp_path):
    """The wheel holds garden/conf/, where config_dir() looks first when garden is installed."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(root)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("garden-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(root / "conf").as_posix() for p in (root / "conf").rglob("*.yaml")}
    assert {f"garden/conf/{name}" for name in expected} <= names
    assert "garden/__main__.py" in names


def test_params_yaml_is_conf_study_composed():
    """params.yaml is what DVC's Hydra composition writes from conf/study.yaml (`make params`)."""
    from omegaconf import OmegaConf

    from garden.stages import compose_study

    committed = OmegaConf.load(Path(__file__).resolve().parents[1] / "params.yaml")
    assert OmegaConf.to_container(committed) == OmegaConf.to_container(compose_study())


def test_study_config_names_its_matrix_and_stays_a_garden_config():
    from garden.stages import compose_study

    cfg = compose_study(["model=pythia-70m", "variant=deduped"])
    assert cfg.paths.data_dir == "study" and cfg.evaluation.stages == ["perplexity", "lambada"]
    assert list(cfg.study.models) == ["tiny"] and list(cfg.study.variants) == ["standard", "deduped"]
    assert cfg.model.name == "pythia-70m" and "hydra" not in cfg


def test_stages_refuse_bad_input_naming_the_choices(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from garden.stages import compose_study, main

    monkeypatch.chdir(tmp_path)
    cfg = compose_study()
    (tmp_path / "params.yaml").write_text(OmegaConf.to_yaml(cfg))
    unknown = r"Could not find .model/gpt2. \(models: local, olmo2-13b, .*, pythia-1.4b, .*, tiny\)"
    with pytest.raises(SystemExit, match=unknown):
        main(["sweep", "--model", "gpt2", "--variant", "standard"])
    with pytest.raises(SystemExit, match=r"valid: standard \(model=pythia-14m has no deduped variant\)"):
        main(["sweep", "--model", "pythia-14m", "--variant", "deduped"])
    cfg.paths.data_dir = "elsewhere"
    (tmp_path / "params.yaml").write_text(OmegaConf.to_yaml(cfg))
    with pytest.raises(SystemExit, match=r"keep paths\.data_dir=study"):
        main(["metrics"])
    assert not (tmp_path / "study").exists()
