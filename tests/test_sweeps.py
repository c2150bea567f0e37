"""Sweeps (`python -m garden -m ...`): one MLflow parent run per sweep, a child per job, in any launcher."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from conftest import neox_state, planted_fork, run_garden, write_series

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    steps = [0, 1, 2, 4, 8, 16]
    values = planted_fork(steps, onset=4, n=16 * 200)
    return write_series(tmp_path_factory.mktemp("sweep") / "s", {s: neox_state(v.reshape(200, 16), d=16)
                                                                   for s, v in values.items()})  # fmt: skip


@pytest.mark.parametrize(
    "launcher",
    [
        ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"],
    ],
    ids=["joblib", "submitit_local"],
)
def test_sweep_makes_a_parent_run_with_a_child_per_job(tmp_path, series, launcher):
    done = run_garden(
        tmp_path, "-m", *launcher, "model=local", f"model.path={series}", "metrics=minimal",
        "layer=unembedding,embedding", f"hydra.sweep.dir={tmp_path}/sweep",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("garden").experiment_id])
    parents = [r for r in runs if r.data.tags.get("garden.sweep") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert "layer=unembedding,embedding" in parent.data.tags["garden.sweep_overrides"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == [
        "local/standard/embedding",
        "local/standard/unembedding",
    ]
    assert all(r.info.status == "FINISHED" for r in children)
    assert all("bifurcation_step" in r.data.metrics for r in children if "unembedding" in r.info.run_name)


def test_single_runs_have_no_parent(tmp_path, series):
    done = run_garden(tmp_path, "model=local", f"model.path={series}", "metrics=minimal")
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("garden").experiment_id])
    assert "mlflow.parentRunId" not in run.data.tags
