"""Sweeps (`python -m garden -m ...`): one MLflow parent run per sweep, a child per job, in any launcher."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
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


def test_four_parallel_jobs_on_one_sqlite_store_lose_nothing(tmp_path, series):
    """4 joblib workers write params, per-step metric batches, summaries, tags and artifacts to the same
    sqlite file at once: every run must hold all of it."""
    done = run_garden(
        tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "model=local",
        f"model.path={series}", "metrics=minimal", "seed=0,1,2,3", f"hydra.sweep.dir={tmp_path}/sweep",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("garden").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("garden.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["seed"] for r in children) == ["0", "1", "2", "3"]
    steps = [0, 1, 2, 4, 8, 16]
    for run in children:
        assert run.info.status == "FINISHED"
        assert len(run.data.params) > 50
        for key in ("msd", "bimodality_coefficient"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == steps
        assert {"n_steps", "alpha", "bifurcation_step"} <= set(run.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"tables", "figures", "summary.json"} <= artifacts

    # The sweep compared in one view: table and figures logged to the parent run.
    compared = subprocess.run(
        [sys.executable, "-m", "garden.compare", "--sweep-dir", f"{tmp_path}/sweep",
         "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--output", f"{tmp_path}/compare"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stderr[-3000:]
    table = pd.read_csv(tmp_path / "compare" / "comparison.csv")
    assert sorted(table["run_id"]) == sorted(r.info.run_id for r in children)
    assert {"msd_overlay.png", "bimodality_coefficient_overlay.png", "bifurcation_vs_size.png"} <= {
        a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(parent.info.run_id, "comparison/figures")
    }
