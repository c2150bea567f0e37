"""Sweeps (`python -m garden -m ...`): one MLflow parent run per sweep, a child per job, in any launcher."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import SHRUNK_TINY, neox_state, planted_fork, run_garden, write_series
from garden import cache

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
        tmp_path, "-m", *launcher, "model=local", f"model.path={series}", "metrics=minimal", "figures=false",
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
    assert all(
        "summary/bifurcation_step" in r.data.metrics for r in children if "unembedding" in r.info.run_name
    )


def job_logs(sweep_dir) -> list[str]:
    return [log.read_text() for log in sorted(sweep_dir.glob("*/*.log"))]


THRESHOLDS = "0.01,0.05,0.1,0.3"


def test_parallel_jobs_share_one_extraction_and_one_sqlite_store(tmp_path, series):
    """4 jobs at once that differ only in a metric setting: the extraction they share is made once (the
    others wait on its lock, then reuse it), and every run holds all it wrote to the sqlite file."""
    done = run_garden(
        tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "model=local",
        f"model.path={series}", "metrics=minimal", f"metrics.stationary_threshold={THRESHOLDS}",
        "figures=false", f"hydra.sweep.dir={tmp_path}/sweep",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("garden").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("garden.sweep") == "parent"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["metrics.stationary_threshold"] for r in children) == sorted(
        THRESHOLDS.split(",")
    )
    computed = [
        int(m)
        for text in job_logs(tmp_path / "sweep")
        for m in re.findall(r"(\d+) of 6 steps computed", text)
    ]
    assert len(computed) == 4 and sum(computed) == 6  # one extraction per step, all jobs together
    assert {r.data.tags["garden.cache.extract"] for r in children} == {cache.code_version("extract")}
    steps = [0, 1, 2, 4, 8, 16]
    for run in children:
        assert run.info.status == "FINISHED"
        assert len(run.data.params) > 50
        for group, key in (("diffusion", "msd"), ("bimodality", "bimodality_coefficient")):
            assert [m.step for m in client.get_metric_history(run.info.run_id, f"{group}/{key}")] == steps
        assert {"summary/alpha", "summary/bifurcation_step"} <= set(run.data.metrics)
        assert "run.n_steps" in run.data.params and "summary/n_steps" not in run.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"tables", "summary.json"} <= artifacts and "figures" not in artifacts  # figures=false

    # The sweep compared in one view: table and figures logged to the parent run.
    from garden.compare import main as compare  # in-process: the sweep is the subject, not this command

    compare(["--sweep-dir", f"{tmp_path}/sweep", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
             "--output", f"{tmp_path}/compare"])  # fmt: skip
    table = pd.read_csv(tmp_path / "compare" / "comparison.csv")
    assert sorted(table["run_id"]) == sorted(r.info.run_id for r in children)
    logged = {
        a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(parent.info.run_id, "comparison/figures")
    }
    assert {"msd_overlay.png", "bimodality_coefficient_overlay.png"} <= logged
    assert "bifurcation_vs_size.png" not in logged  # one model size: no empty onset-vs-size frame
    # The jobs differ in a key their names do not hold: each name says its value, the table has a column.
    names = sorted(r.info.run_name for r in children)
    assert names == [
        f"local/standard/unembedding metrics.stationary_threshold={t}" for t in sorted(THRESHOLDS.split(","))
    ]
    assert sorted(table["metrics.stationary_threshold"].astype(str)) == sorted(THRESHOLDS.split(","))


def test_parallel_jobs_on_an_untrained_tiny_series_train_it_once(tmp_path, small_corpus):
    """The README's sweep on a series not trained yet: one job trains it, the others wait and reuse it."""
    done = run_garden(
        tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=3", *SHRUNK_TINY,
        f"corpus.path={small_corpus}", "metrics=minimal", "figures=false", "layer=unembedding,mlp_out,attn_v",
        f"hydra.sweep.dir={tmp_path}/sweep",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("garden").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4  # 3 jobs and their parent
    logs = job_logs(tmp_path / "sweep")
    assert len(logs) == 3
    assert sum(text.count("training the tiny series") for text in logs) == 1
    trained = [p for p in (tmp_path / "data" / "series").iterdir() if not p.name.startswith(".")]
    assert len(trained) == 1


def test_a_failing_job_ends_the_sweep_parent_failed(tmp_path, series):
    done = run_garden(
        tmp_path, "-m", "model=local", f"model.path={series}", "metrics=minimal", "figures=false",
        "extract.reference_step=0,3", f"hydra.sweep.dir={tmp_path}/sweep",
    )  # fmt: skip
    assert done.returncode != 0
    assert "extract.reference_step=3 is not a step of the series" in done.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("garden").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("garden.sweep") == "parent"]
    assert parent.info.status == "FAILED"
    assert all(r.info.status != "RUNNING" for r in runs)
