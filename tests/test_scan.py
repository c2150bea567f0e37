"""The whole-model scan's selection (garden.scan): roles x blocks x globs, checked before any read."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from garden.config import config_dir
from garden.errors import GardenError
from garden.families import FAMILIES
from garden.scan import select_tensors


@pytest.fixture(scope="module")
def tiny_names() -> list[str]:
    from garden.settings import ModelSettings, read_section
    from garden.tiny import tensor_names_on_disk

    values = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / "tiny.yaml"))
    values["train"]["seed"] = 0
    return tensor_names_on_disk(read_section(ModelSettings, values, "model."))


CONFIG = {"num_attention_heads": 4}


def test_by_default_every_stored_role_in_every_block_each_read_once(tiny_names):
    chosen = select_tensors(FAMILIES["gpt_neox"], CONFIG, tiny_names, num_layers=4)
    assert [(t.role, t.block) for t in chosen[:2]] == [("unembedding", None), ("embedding", None)]
    assert len(chosen) == 2 + 4 * 4  # qkv, attn_out, mlp_in, mlp_out per block; no derived q/k/v rows
    assert {t.name for t in chosen} == {n for n in tiny_names if n.endswith(".weight") and "norm" not in n}
    assert all(t.role != "attn_q" for t in chosen)


def test_roles_blocks_and_globs_narrow_and_widen_the_selection(tiny_names):
    family = FAMILIES["gpt_neox"]
    chosen = select_tensors(family, CONFIG, tiny_names, 4, roles=["mlp_out", "attn_v"], blocks=[1, 3])
    assert [(t.role, t.block) for t in chosen] == [
        ("mlp_out", 1),
        ("mlp_out", 3),
        ("attn_v", 1),
        ("attn_v", 3),
    ]
    assert chosen[2].name == "gpt_neox.layers.1.attention.query_key_value.weight[v]"
    biases = select_tensors(family, CONFIG, tiny_names, 4, roles=["mlp_out"], blocks=[0], include=["*.bias"],
                            exclude=["*norm*"])  # fmt: skip
    assert biases[0].name == "gpt_neox.layers.0.mlp.dense_4h_to_h.weight"
    extra = sorted(t.name for t in biases[1:])  # block 0's biases only (scan.blocks), norms excluded
    assert extra == sorted(
        f"gpt_neox.layers.0.{m}.bias"
        for m in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    )
    assert {t.block for t in biases} == {0}


def test_bad_selections_are_named_with_what_exists(tiny_names):
    family = FAMILIES["gpt_neox"]
    with pytest.raises(GardenError, match=r"scan.blocks \[4, 7\] are out of range: the model has 4 blocks"):
        select_tensors(family, CONFIG, tiny_names, 4, blocks=[0, 4, 7])
    with pytest.raises(
        GardenError, match=r"the scan selects no tensor .*the checkpoints hold: embed_out.weight"
    ):
        select_tensors(family, CONFIG, tiny_names, 4, roles=[], include=["*.nothing"])
    without_head = [n for n in tiny_names if n != "embed_out.weight"]
    with pytest.raises(GardenError, match=r"names no 'unembedding' tensor .*its roles: embedding, attn_qkv"):
        select_tensors(family, CONFIG, without_head, 4, roles=["unembedding"])


@pytest.mark.parametrize("layout", ["safetensors", "sharded_safetensors", "bin", "sharded_bin"])
def test_a_checkpoint_is_read_once_for_all_its_selected_tensors(tmp_path, layout, monkeypatch):
    import torch

    from conftest import write_series
    from garden import formats
    from garden.series import LocalSeries

    gen = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(8, 4, generator=gen).half() for i in range(6)}
    series = LocalSeries(write_series(tmp_path / layout, {0: state}, layout))
    opened = []
    for name in ("safe_open", "load_bin"):
        real = getattr(formats, name)
        monkeypatch.setattr(
            formats, name, lambda path, *a, real=real, **k: (opened.append(str(path)), real(path, *a, **k))[1]
        )
    wanted = ["layer5.weight", "layer0.weight", "layer3.weight"]
    found = series.read_tensors(0, wanted)
    assert list(found) == wanted
    assert all(torch.equal(found[n], state[n]) and found[n].dtype == torch.float16 for n in wanted)
    assert len(opened) == len(set(opened)) == (2 if layout.startswith("sharded") else 1)  # each file once
    with pytest.raises(GardenError, match=r"step 0.*'nothing.weight'"):
        series.read_tensors(0, ["layer0.weight", "nothing.weight"])


# ------------------------------------------------------------------------------------ the scan's pass


def _walk_series(tmp_path, steps=(0, 10, 20, 40, 80), layout="safetensors"):
    """A GPT-NeoX-named series of 2 blocks whose every weight random-walks."""
    from conftest import random_walk, write_series

    shapes = {"gpt_neox.embed_in.weight": (32, 8), "embed_out.weight": (32, 8)}
    for i in range(2):
        p = f"gpt_neox.layers.{i}."
        shapes.update({p + "attention.query_key_value.weight": (24, 8), p + "attention.dense.weight": (8, 8),
                       p + "mlp.dense_h_to_4h.weight": (32, 8),
                       p + "mlp.dense_4h_to_h.weight": (8, 32)})  # fmt: skip
    walks = {name: random_walk(list(steps), shape, 1e-4, seed=k)
             for k, (name, shape) in enumerate(shapes.items())}  # fmt: skip
    tensors = {step: {name: walks[name][step] for name in shapes} for step in steps}
    config = {"model_type": "gpt_neox", "num_attention_heads": 2, "num_hidden_layers": 2}
    return write_series(tmp_path / "series", tensors, layout, config), list(shapes)


def _plans(names, steps, **extract):
    from garden.extract import ExtractionPlan

    return [ExtractionPlan(tensor=name, steps=tuple(steps), reference_step=steps[0], n_distribution_sample=64,
                           unit_sample=16, **extract) for name in names]  # fmt: skip


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_a_scan_writes_the_records_a_one_tensor_extraction_writes_and_each_reuses_the_other(
    tmp_path, layout, monkeypatch
):
    import numpy as np

    from garden.extract import extract
    from garden.extract.stream import extract_scan
    from garden.series import LocalSeries

    root, names = _walk_series(tmp_path, layout=layout)
    series = LocalSeries(root)
    steps = series.steps()
    plans = _plans(names, steps)
    scanned = extract_scan(series, plans, tmp_path / "scan", progress=False)
    assert sum(s.computed for s in scanned) == len(names) * len(steps)
    for plan, tensor in zip(plans, scanned, strict=True):
        alone = extract(series, plan, tmp_path / "alone", progress=False)
        together = tensor.trajectory()
        assert together.table.equals(alone.table), plan.tensor
        np.testing.assert_array_equal(together.hist, alone.hist)
        np.testing.assert_array_equal(together.units.stats["dip"], alone.units.stats["dip"])
    # The same cache both ways: a scan after one-tensor runs computes nothing, and the reverse.
    again = extract_scan(series, plans, tmp_path / "alone", progress=False)
    assert sum(s.computed for s in again) == 0
    from garden.extract import records

    def computes(*args, **kwargs):
        raise AssertionError("a record was computed")

    monkeypatch.setattr(records, "step_record", computes)
    monkeypatch.setattr(records, "make_meta", computes)
    reused = extract(series, plans[3], tmp_path / "scan", progress=False)
    assert reused.table.equals(scanned[3].trajectory().table)


# ------------------------------------------------------------------------------------------ task=scan


def _local(tmp_path) -> list[str]:
    """The overrides of a job on `_walk_series`, with its data and MLflow store under tmp_path."""
    return ["model=local", f"model.path={tmp_path / 'series'}", "progress=false", "metrics=minimal",
            f"paths.data_dir={tmp_path}/data", "extract.n_distribution_sample=64",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip


def _scan_config(compose_config, tmp_path, *overrides):
    return compose_config("task=scan", *_local(tmp_path), *overrides)


def test_scan_writes_a_row_per_tensor_the_long_table_maps_and_few_mlflow_keys(tmp_path, compose_config,
                                                                              monkeypatch):  # fmt: skip
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from garden.extract import records
    from garden.tasks import run

    _walk_series(tmp_path)
    outcome = run(_scan_config(compose_config, tmp_path), output_dir=tmp_path / "out")
    summary = pd.read_csv(tmp_path / "out" / "tables" / "scan_summary.csv")
    assert list(summary.columns[:11]) == ["role", "block", "tensor", "shape", "units", "bifurcation_step",
                                          "unit_bifurcation_step", "final_bimodal_unit_fraction",
                                          "stationary_step", "alpha", "final_msd"]  # fmt: skip
    assert len(summary) == 2 + 2 * 4 and summary.loc[0, "role"] == "unembedding"
    assert (
        summary.loc[summary["tensor"] == "gpt_neox.layers.1.mlp.dense_4h_to_h.weight", "units"].item() == 32
    )
    steps = pd.read_parquet(tmp_path / "out" / "tables" / "scan_steps.parquet")
    assert list(steps.columns) == ["step", "tensor", "role", "block", "metric", "value"]
    msd = steps[(steps["metric"] == "msd") & (steps["tensor"] == "embed_out.weight")]
    assert msd["step"].tolist() == [0, 10, 20, 40, 80] and msd["value"].iloc[0] == 0.0
    for name in ("scan_relative_displacement", "scan_msd", "scan_fork_map", "scan_stationary_map"):
        assert (tmp_path / "out" / "figures" / f"{name}.png").is_file()
        assert (tmp_path / "out" / "figures" / f"{name}.svg").is_file()
    run_ = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(outcome["run_id"])
    assert run_.info.status == "FINISHED"
    assert 5 < len(run_.data.metrics) < 40  # aggregates, not a key per tensor and metric
    assert run_.data.params["run.scan_tensors"] == "10"  # a count: a param, not a one-bar chart
    # The description leads with the scan's result in a sentence, then the two maps.
    note = run_.data.tags["mlflow.note.content"].splitlines()
    assert note[0].startswith("**") and note[0].endswith("of 10 become stationary.**"), note[0]
    assert "previews%2Fscan_fork_map.png" in note[2] and "previews%2Fscan_stationary_map.png" in note[2]
    assert run_.data.tags["garden.cached"] == "none"

    # A one-tensor job after the scan computes nothing: its records are the scan's.
    def computes(*args, **kwargs):
        raise AssertionError("a record was computed")

    monkeypatch.setattr(records, "step_record", computes)
    monkeypatch.setattr(records, "make_meta", computes)
    one = run(compose_config(*_local(tmp_path), "figures=false", "layer=mlp_out", "layer.index=1"),
              output_dir=tmp_path / "one")  # fmt: skip
    row = summary[summary["tensor"] == "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"].iloc[0]
    assert one.summary["final_msd"] == pytest.approx(row["final_msd"], rel=1e-12)


def test_a_scan_after_a_one_tensor_job_computes_only_the_other_tensors(tmp_path, compose_config, caplog):
    import logging

    from garden.tasks import run

    _walk_series(tmp_path)
    run(compose_config(*_local(tmp_path), "figures=false", "layer=attn_out", "layer.index=0"),
        output_dir=tmp_path / "one")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="garden"):
        run(_scan_config(compose_config, tmp_path, "figures=false"), output_dir=tmp_path / "out")
    assert "scan of 10 tensors: 45 of 50 records computed, 5 reused from the cache" in caplog.text


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ("scan.blocks=[0,4]", r"scan.blocks \[4\] are out of range: the model has 2 blocks"),
        ("scan.blocks=3:", r"scan.blocks=3: selects no block; the model has 2 blocks"),
        ("scan.exclude=['*']", r"the scan selects no tensor .*the checkpoints hold: embed_out.weight"),
        ("scan.roles=[attn_q,nonsense]", r"scan.roles.*unknown role\(s\): nonsense"),
        ("scan.blocks=two", r"scan.blocks.*a range start:stop"),
    ],
)
def test_bad_scan_settings_fail_before_anything_is_read(tmp_path, compose_config, override, error):
    from garden.tasks import run

    _walk_series(tmp_path)
    with pytest.raises(GardenError, match=error):
        run(_scan_config(compose_config, tmp_path, override), output_dir=tmp_path / "out")
    assert not (tmp_path / "data" / "extract").exists() and not (tmp_path / "out").exists()


def test_a_derived_role_is_scanned_through_its_stored_parts(tmp_path, compose_config):
    import pandas as pd

    from garden.tasks import run

    _walk_series(tmp_path)
    config = _scan_config(compose_config, tmp_path, "scan.roles=[attn_q,attn_v]", "scan.blocks=[1]")
    run(config, output_dir=tmp_path / "out")
    summary = pd.read_csv(tmp_path / "out" / "tables" / "scan_summary.csv")
    assert summary["tensor"].tolist() == [f"gpt_neox.layers.1.attention.query_key_value.weight[{p}]"
                                          for p in ("q", "v")]  # fmt: skip
    assert summary["shape"].tolist() == ["8x8", "8x8"]


@pytest.mark.slow
def test_a_two_shard_sweep_merged_gives_the_single_scans_summary(tmp_path):
    """scan.blocks=0:1,1:2 in a joblib sweep (the shards at once, on one cache), merged by
    `garden.compare --scan`, against one scan of the same series with a cache of its own."""
    import pandas as pd

    from conftest import run_garden
    from garden.compare import main as compare

    _walk_series(tmp_path)
    common = ["task=scan", "model=local", f"model.path={tmp_path / 'series'}", "metrics=minimal",
              "extract.n_distribution_sample=64", "figures=false"]  # fmt: skip
    done = run_garden(tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *common,
                      "scan.blocks=0:1,1:2", f"hydra.sweep.dir={tmp_path}/sweep")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    compare(["--scan", "--sweep-dir", f"{tmp_path}/sweep", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
             "--output", f"{tmp_path}/merged"])  # fmt: skip
    single = tmp_path / "single"
    single.mkdir()
    done = run_garden(single, *common)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = pd.read_csv(tmp_path / "merged" / "tables" / "scan_summary.csv")
    assert merged["run_id"].nunique() == 2
    alone = pd.read_csv(single / "out" / "tables" / "scan_summary.csv")
    pd.testing.assert_frame_equal(merged.drop(columns="run_id"), alone)
    assert (tmp_path / "merged" / "figures" / "scan_fork_map.png").is_file()
    steps = pd.read_parquet(tmp_path / "merged" / "tables" / "scan_steps.parquet")
    assert len(steps.drop(columns="run_id")) == len(
        pd.read_parquet(single / "out" / "tables" / "scan_steps.parquet")
    )


def test_an_interrupted_scan_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Interrupted in the middle of a step (the 23rd record of 50), a scan keeps every record it finished
    (the one waiting for its dips included) and the next scan computes only the rest."""
    from garden.extract import records
    from garden.extract.stream import extract_scan
    from garden.series import LocalSeries

    root, names = _walk_series(tmp_path)
    series = LocalSeries(root)
    plans = _plans(names, series.steps())
    original, calls = records.step_record, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 23:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(records, "step_record", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_scan(series, plans, tmp_path / "cache", progress=False)
    monkeypatch.setattr(records, "step_record", original)
    again = extract_scan(series, plans, tmp_path / "cache", progress=False)
    assert sum(s.computed for s in again) == len(names) * len(series.steps()) - 22
