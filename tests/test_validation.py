"""Every setting validated before work starts: the setting, its value and what is valid, nothing done."""

from __future__ import annotations

import time

import pytest

from garden.errors import GardenError
from garden.tasks import run
from garden.validation import check_tracking_store


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "extract.n_distribution_sample=0",
            r"extract.n_distribution_sample=0 is not valid; valid: an integer >= 4",
        ),
        ("model.train.steps=0", r"model.train.steps=0 is not valid; valid: an integer >= 1"),
        ("model.train.interval=0", r"model.train.interval=0 is not valid"),
        ("model.train.batch_size=0", r"model.train.batch_size=0 is not valid"),
        ("seed=-1", r"seed=-1 is not valid; valid: an integer >= 0"),
        ("model.train.lr=0", r"model.train.lr=0 is not valid; valid: a number in \(0, inf\]"),
        (
            "model.train.save_dtype=int8",
            r"save_dtype='int8' is not valid; valid: one of float32, float16, bfloat16",
        ),
        (
            "metrics.stationary_threshold=2",
            r"metrics.stationary_threshold=2 is not valid; valid: a number in \(0, 1\)",
        ),
        ("metrics.dip_pvalue=abc", r"metrics.dip_pvalue='abc' is not valid"),
        ("extract.quantiles=[0.5,1.5]", r"extract.quantiles=\[0.5, 1.5\] is not valid"),
        ("metrics.alpha_max_step=1", r"metrics.alpha_max_step=1 is not valid; valid: null or above"),
        ("model.architecture.num_attention_heads=3", r"hidden_size=128 is not valid; valid: a multiple of"),
        ("model.train.seq_len=999", r"model.train.seq_len=999 is not valid; valid: at most"),
        ("series.retries=-2", r"series.retries=-2 is not valid"),
        ("series.prefetch=-1", r"series.prefetch=-1 is not valid; valid: an integer in \[0, 64\]"),
        ("steps=log steps.count=1", r"steps.count=1 is not valid; valid: an integer >= 2"),
        ("progress=maybe", r"progress='maybe' is not valid; valid: true or false"),
        (
            "evaluation.cka.threshold=1.5",
            r"evaluation.cka.threshold=1.5 is not valid; valid: a number in \(0, 1\]",
        ),
        ("cooccurrence.attention_move_fraction=0", r"cooccurrence.attention_move_fraction=0 is not valid"),
        ("paths.data_dir=/proc/garden-data", r"paths.data_dir='/proc/garden-data' is not writable"),
        (
            "tracking.uri=sqlite:////proc/x.db",
            r"tracking.uri='sqlite:////proc/x.db' cannot be opened for writing",
        ),
        ("tracking.uri=sqlite:////nowhere/at/all/m.db", r"the folder /nowhere/at/all does not exist"),
    ],
)
def test_a_bad_setting_fails_at_once_naming_it_with_nothing_done(tmp_path, compose_config, override, message):
    defaults = [
        f"paths.data_dir={tmp_path}/data",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "progress=false",
    ]
    cfg = compose_config(*defaults, *override.split(" "))
    began = time.perf_counter()
    with pytest.raises(GardenError, match=message):
        run(cfg, output_dir=tmp_path / "out")
    assert time.perf_counter() - began < 10  # MLflow's own retries on a bad store take ~100 s
    assert not (tmp_path / "data" / "series").exists()  # nothing trained
    assert not (tmp_path / "mlflow.db").exists()  # no run created


@pytest.mark.parametrize(
    "override, message",
    [
        ("series.endpoint=ftp://mirror", r"series.endpoint='ftp://mirror' is not valid; valid: null"),
        ("paths.cache_dir=/proc/garden-cache", r"paths.cache_dir='/proc/garden-cache' is not writable"),
    ],
)
def test_hub_settings_fail_before_any_request(tmp_path, compose_config, override, message):
    cfg = compose_config("model=pythia-14m", f"paths.data_dir={tmp_path}/data", "series.retries=0",
                         f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "series.endpoint=http://127.0.0.1:9",
                         override)  # fmt: skip
    with pytest.raises(GardenError, match=message):
        run(cfg, output_dir=tmp_path / "out")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_writable_store_passes_and_keeps_its_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    check_tracking_store(uri)
    assert not (tmp_path / "m.db").exists()  # a store not made yet is left for MLflow to create
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("probe")
    client.set_terminated(client.create_run(experiment).info.run_id)
    check_tracking_store(uri)  # a store in use is only locked and rolled back, never changed
    assert len(client.search_runs([experiment])) == 1
    check_tracking_store(f"file:{tmp_path}/mlruns")
    with pytest.raises(GardenError, match="cannot be opened"):
        check_tracking_store("http://127.0.0.1:9/", timeout_seconds=2)


def test_runs_cleanup_ends_only_runs_whose_process_is_gone(tmp_path, capsys):
    """`python -m garden.runs cleanup`: a run of a dead process on this host ends KILLED; a live one and
    one written from another host are left alone."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from garden import runs
    from garden.tracking import process_tags

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("garden")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = gone.stdout.strip()
    tags = {
        "dead": {**process_tags(), "garden.pid": dead_pid, "garden.process_start": "1"},
        "alive": process_tags(),
        "elsewhere": {**process_tags(), "garden.host": "another-node", "garden.pid": dead_pid},
    }
    ids = {name: client.create_run(experiment, tags=t, run_name=name).info.run_id for name, t in tags.items()}
    runs.main(["cleanup", "--tracking-uri", uri])
    assert "ended 1 run(s) as KILLED" in capsys.readouterr().out
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING"}
