"""The Hub source against a fake Hub on 127.0.0.1: every layout, duplicates, faults, cache, offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import neox_state, planted_fork, run_garden, write_series
from fakehub import FakeHub, Fault
from garden.errors import GardenError
from garden.hub import HubSeries

REPO = "garden-test/neox-fork"
STEPS = [0, 1, 2, 4, 8, 12, 16, 20, 24]
LAYOUT = {2: "sharded_safetensors", 4: "bin", 8: "sharded_bin"}  # the rest: single safetensors
HEAD = "embed_out.weight"


def branch_states() -> dict[int, dict[str, torch.Tensor]]:
    values = planted_fork(STEPS, onset=8, n=16 * 1000)
    values[1] = values[0].clone()  # Pythia's step0 == step1 fault: a duplicated branch
    return {s: neox_state(v.reshape(1000, 16).half(), d=16) for s, v in values.items()}


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    for step, state in branch_states().items():
        staging = root / "staging"
        write_series(staging, {step: state}, LAYOUT.get(step, "safetensors"))
        (root / REPO).mkdir(parents=True, exist_ok=True)
        (staging / f"step{step}").rename(root / REPO / f"step{step}")
        shutil.rmtree(staging)
    (root / REPO / "step24" / "config.json").write_text('{"num_hidden_layers": 2}')
    return root


@pytest.fixture
def hub(hub_root):
    with FakeHub(hub_root) as server:
        yield server


def series_on(hub, cache, **kwargs) -> HubSeries:
    kwargs.setdefault("sleep", lambda seconds: None)
    return HubSeries(REPO, "fork", cache_dir=cache, endpoint=hub.url, **kwargs)


def test_every_layout_reads_the_right_tensor(hub, tmp_path):
    series = series_on(hub, tmp_path)
    assert series.steps() == STEPS
    states = branch_states()
    for step in STEPS:
        torch.testing.assert_close(series.read_tensor(step, HEAD), states[step][HEAD], rtol=0, atol=0)
    assert series.locate(2, HEAD).filename.startswith("model-0000")
    assert series.locate(4, HEAD).fmt == "bin" and series.locate(8, HEAD).filename.startswith(
        "pytorch_model-0000"
    )
    assert "gpt_neox.layers.1.mlp.dense_4h_to_h.weight" in series.tensor_names(2)
    # step1 shares step0's file: same content id, read from the content-addressed cache.
    assert series.content_id(1, HEAD) == series.content_id(0, HEAD) != series.content_id(12, HEAD)
    assert series.how[1] == "cache"


def test_range_reads_fetch_little_more_than_the_tensor(hub, tmp_path):
    series = series_on(hub, tmp_path)
    series.read_tensor(12, HEAD)
    tensor_bytes = 1000 * 16 * 2
    # The header probe takes the whole (small) file here; the tensor itself is fetched exactly once more.
    assert series.fetched[12] <= series.locate(12, HEAD).size + tensor_bytes
    before = hub.bytes_sent
    again = series_on(hub, tmp_path)
    again.read_tensor(12, HEAD)
    assert hub.bytes_sent == before and again.fetched == {}  # a second run fetches nothing


def test_faults_are_retried_and_never_used(hub, tmp_path):
    hub.faults = [
        Fault("step12/model.safetensors", "500", 2),
        Fault("step12/model.safetensors", "truncate"),
        Fault("step12/model.safetensors", "drop"),
        Fault("paths-info/step16", "500"),
    ]
    waits: list[float] = []
    series = series_on(hub, tmp_path, retries=5, backoff_seconds=0.5, sleep=waits.append)
    torch.testing.assert_close(series.read_tensor(12, HEAD), branch_states()[12][HEAD], rtol=0, atol=0)
    assert waits == [0.5, 1.0, 2.0, 4.0]  # exponential backoff over the four header/range faults
    series.read_tensor(16, HEAD)


def test_corrupt_download_is_discarded_and_fetched_again(hub, tmp_path):
    hub.faults = [Fault("step4/pytorch_model.bin", "corrupt")]
    series = series_on(hub, tmp_path)
    torch.testing.assert_close(series.read_tensor(4, HEAD), branch_states()[4][HEAD], rtol=0, atol=0)
    assert series.how[4] == "download"


def test_persistent_faults_fail_naming_the_step_and_a_rerun_resumes(hub, tmp_path):
    hub.faults = [Fault("step16/model.safetensors", "500", 10)]
    series = series_on(hub, tmp_path, retries=2)
    with pytest.raises(GardenError, match=r"step 16: .*failed after 3 attempts"):
        series.read_tensor(16, HEAD)
    hub.faults = []
    torch.testing.assert_close(series_on(hub, tmp_path).read_tensor(16, HEAD), branch_states()[16][HEAD])


def test_offline_works_from_the_cache_and_names_missing_steps(hub, tmp_path, monkeypatch):
    online = series_on(hub, tmp_path)
    for step in (0, 4, 12):
        online.read_tensor(step, HEAD)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = series_on(hub, tmp_path)
    assert offline.missing_from_cache([0, 4, 12], HEAD) == []
    torch.testing.assert_close(offline.read_tensor(4, HEAD), branch_states()[4][HEAD])
    assert offline.missing_from_cache([0, 2, 12, 16], HEAD) == [2, 16]
    with pytest.raises(GardenError, match="HF_HUB_OFFLINE"):
        offline.read_tensor(16, HEAD)


# ------------------------------------------------------------------------------------------- the CLI


def garden(
    workdir: Path, hub: FakeHub, *overrides: str, offline: bool = False
) -> subprocess.CompletedProcess:
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_CACHE": str(workdir / "hf"),
        "HF_HUB_OFFLINE": "1" if offline else "0",
    }
    return run_garden(workdir, "series.backoff_seconds=0.01", *overrides, env=env)


HUB_MODEL = ["model=pythia-14m", f"model.repo={REPO}", "model.architecture.num_hidden_layers=2"]


@pytest.mark.slow
def test_cli_on_the_hub_matches_the_same_series_on_disk(hub, tmp_path):
    done = garden(tmp_path, hub, *HUB_MODEL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step1 = step0" in (tmp_path / "out" / "__main__.log").read_text()  # the warning names them
    fetched_once = hub.bytes_sent

    local = tmp_path / "local"
    write_series(local, {s: v for s, v in branch_states().items() if s != 1}, "safetensors")
    same = garden(tmp_path, hub, "model=local", f"model.path={local}", f"hydra.run.dir={tmp_path}/o2")
    assert same.returncode == 0, same.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("garden").experiment_id])
    by_model = {r.data.tags["garden.model"]: r for r in runs}
    hub_run, local_run = by_model["pythia-14m"], by_model["local"]
    assert hub_run.info.run_name == "pythia-14m/standard/unembedding"
    assert hub_run.data.tags["garden.duplicates"] == "step1=step0"
    assert hub_run.data.metrics["n_duplicate_steps"] == 1
    assert 0 < hub_run.data.metrics["hub_bytes_fetched"] <= hub_run.data.metrics["hub_file_bytes"] * 2
    for key in ("bifurcation_step", "alpha", "final_msd", "final_bimodality_coefficient"):
        assert hub_run.data.metrics[key] == pytest.approx(local_run.data.metrics[key], rel=1e-12), key
    hub_msd = [(m.step, m.value) for m in client.get_metric_history(hub_run.info.run_id, "msd")]
    local_msd = [(m.step, m.value) for m in client.get_metric_history(local_run.info.run_id, "msd")]
    assert sorted(hub_msd) == sorted(local_msd) and 1 not in {s for s, _ in hub_msd}
    artifacts = {a.path for a in client.list_artifacts(hub_run.info.run_id, "tables")}
    assert "tables/hub_manifest.csv" in artifacts
    manifest_path = client.download_artifacts(hub_run.info.run_id, "tables/hub_manifest.csv", str(tmp_path))
    manifest = pd.read_csv(manifest_path)
    assert list(manifest["step"]) == STEPS
    step1 = manifest.set_index("step").loc[1]
    assert step1["duplicate_of"] == 0 and not step1["analysed"]
    assert manifest.set_index("step").loc[4, "format"] == "bin"
    assert (manifest["sha256"].str.len() == 64).all()

    # A second run, and an offline one, fetch nothing more.
    assert garden(tmp_path, hub, *HUB_MODEL, f"hydra.run.dir={tmp_path}/o3").returncode == 0
    offline = garden(tmp_path, hub, *HUB_MODEL, f"hydra.run.dir={tmp_path}/o4", offline=True)
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert hub.bytes_sent == fetched_once


@pytest.mark.slow
def test_cli_hub_policies_and_offline_gaps(hub, tmp_path):
    kept = garden(tmp_path, hub, *HUB_MODEL, "series.on_duplicate=keep", "metrics=minimal")
    assert kept.returncode == 0, kept.stderr[-2000:]
    refused = garden(tmp_path, hub, *HUB_MODEL, "series.on_duplicate=error", "metrics=minimal")
    assert (
        refused.returncode != 0
        and "duplicated checkpoints (identical weight files): step1 = step0" in refused.stderr
    )
    other = tmp_path / "other"
    other.mkdir()
    partial = garden(other, hub, *HUB_MODEL, "steps=list", "steps.values=[0,12,24]", "metrics=minimal")
    assert partial.returncode == 0, partial.stderr[-2000:]
    gaps = garden(other, hub, *HUB_MODEL, "metrics=minimal", offline=True)
    assert gaps.returncode != 0
    assert (
        "HF_HUB_OFFLINE is set and the cache lacks embed_out.weight for steps [1, 2, 4, 8, 16, 20]"
        in gaps.stderr
    )


@pytest.mark.slow
def test_deduped_variant_of_models_without_one_fails_at_once(tmp_path):
    for model in ("pythia-14m", "pythia-31m"):
        done = subprocess.run(
            [sys.executable, "-m", "garden", f"model={model}", "variant=deduped"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert done.returncode != 0
        assert f"model={model} has no deduped variant" in done.stderr
