"""End to end: `python -m garden` on small series in a temp dir, read back from MLflow."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import neox_state, planted_fork, run_garden, write_series

pytestmark = pytest.mark.slow

FORK_STEPS = [0, 1, 2, 4, 8, 12, 16, 20, 24]
FIGURES = {
    "figures/density.png",
    "figures/forking_trajectories.png",
    "figures/msd_loglog.png",
    "figures/msd_loglog.svg",
    "figures/displacement.png",
    "figures/bimodality.png",
    "figures/unit_forks.png",
    "figures/bimodal_fraction.png",
    "figures/unit_trajectories.png",
    "figures/unit_density.png",
}


def garden(workdir, *overrides: str) -> subprocess.CompletedProcess:
    return run_garden(workdir, *overrides)


def runs(workdir):
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("garden")
    return client, ([] if experiment is None else client.search_runs([experiment.experiment_id]))


def artifact_paths(client, run_id, path=None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.fixture(scope="module")
def fork_series(tmp_path_factory):
    """A fp16 GPT-NeoX-named series whose unembedding forks at step 8."""
    root = tmp_path_factory.mktemp("series") / "fork"
    values = planted_fork(FORK_STEPS, onset=8, n=16 * 1000)
    states = {s: neox_state(v.reshape(1000, 16).half(), d=16) for s, v in values.items()}
    return write_series(root, states, "safetensors", config={"num_hidden_layers": 2})


def test_cli_logs_the_forking_paths_run(tmp_path, fork_series, compose_config):
    done = garden(tmp_path, "model=local", f"model.path={fork_series}")
    assert done.returncode == 0, done.stderr
    client, found = runs(tmp_path)
    assert len(found) == 1
    assert "mlflow.parentRunId" not in found[0].data.tags  # a single run has no sweep parent
    run = found[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "local/standard/unembedding"
    assert run.data.params["layer.role"] == "unembedding"
    assert run.data.tags["garden.tensor"] == "embed_out.weight"
    assert run.data.tags["garden.family"] == "gpt_neox"  # detected from the tensor names
    assert run.data.params["model.path"] == str(fork_series)
    assert run.data.params["metrics.bifurcation_criterion"] == "bimodality_coefficient"
    for key in ("diffusion/msd", "diffusion/displacement", "bimodality/bimodality_coefficient", "dist/std"):
        history = client.get_metric_history(run.info.run_id, key)
        expected = FORK_STEPS if key != "diffusion/displacement" else FORK_STEPS[1:]
        assert sorted(m.step for m in history) == expected, key
    msd = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "diffusion/msd")}
    assert msd[0] == 0 and msd[24] > msd[12] > 0
    assert run.data.metrics["summary/bifurcation_step"] == 8
    assert run.data.tags["garden.bifurcation"] == "detected"
    # Every entry forks, so every one of the 16 units (columns) does too, from the same step.
    assert run.data.metrics["summary/unit_bifurcation_step"] == 8
    assert run.data.metrics["summary/final_bimodal_unit_fraction"] == 1.0
    assert run.data.tags["garden.unit_bifurcation"] == "detected"
    fraction = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "units/bimodal_unit_fraction")
    }
    assert fraction[4] == 0 and fraction[24] == 1
    printed = done.stdout + done.stderr
    block = printed[printed.index("local/standard/unembedding finished:") :]
    assert re.search(r"pooled bifurcation +at step 8\n +unit bifurcation +at step 8 \(100% of 16", block)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    assert re.search(rf"open it +mlflow ui --backend-store-uri {store} --workers 1", block)
    experiment = client.get_experiment_by_name("garden").experiment_id
    link = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run.info.run_id}?workflowType=machine_learning"
    assert f"then {link}" in block  # the run's own page, on the Model training view
    assert "summary/alpha" in run.data.metrics and run.data.tags["garden.stationary"] in ("detected", "none")
    paths = artifact_paths(client, run.info.run_id)
    assert paths >= FIGURES
    assert {
        "tables/steps.csv",
        "tables/lag_msd.csv",
        "tables/units.csv",
        "summary.json",
        "tables/density.csv",
        "tables/trajectories.csv",
        "tables/trajectory_branches.csv",
        "tables/msd_regimes.csv",
    } <= paths

    # A second run (in-process) reuses the extraction cache and reports the same numbers.
    run_in_process(compose_config, tmp_path, "model=local", f"model.path={fork_series}", out="o2")
    _, both = runs(tmp_path)
    assert len(both) == 2
    assert (
        both[0].data.metrics["summary/bifurcation_step"]
        == both[1].data.metrics["summary/bifurcation_step"]
        == 8
    )
    assert both[0].data.metrics["summary/alpha"] == both[1].data.metrics["summary/alpha"]


def test_help_says_what_garden_does_and_lists_the_choices(tmp_path):
    done = subprocess.run([sys.executable, "-m", "garden", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("garden: reproducible studies of language-model training dynamics")
    assert "powered by Hydra" not in done.stdout and "README.md" in done.stdout
    assert (
        "layer: attn_k, attn_out, attn_q, attn_qkv, attn_v, embedding, mlp_in, mlp_out, unembedding"
        in done.stdout
    )
    assert "olmo2-1b" in done.stdout and "mlflow ui --backend-store-uri sqlite:///mlflow.db" in done.stdout


def test_block_layer_and_step_selection(tmp_path, fork_series, compose_config):
    run_in_process(
        compose_config,
        tmp_path,
        "model=local",
        f"model.path={fork_series}",
        "layer=mlp_out",
        "layer.index=1",
        "steps=list",
        "steps.values=[0,4,24]",
        "metrics=minimal",
    )
    client, (run,) = runs(tmp_path)
    assert run.info.run_name == "local/standard/mlp_out.1"
    assert run.data.tags["garden.tensor"] == "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "diffusion/msd")) == [0, 4, 24]
    # The block tensor never moves in this series: no fork, no motion.
    assert run.data.tags["garden.bifurcation"] == "none"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=gpt5"], "Available options in 'model'"),
        (["model=local", "model.path="], "needs model.path"),
    ],
)
def test_bad_input_on_the_command_line_exits_non_zero_before_any_work(tmp_path, overrides, message):
    done = garden(tmp_path, *overrides)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-3000:]
    assert runs(tmp_path)[1] == []  # no MLflow run was started
    assert not (tmp_path / "out").exists()  # and no empty output folder is left behind


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=local", "layer=mlp_out", "layer.index=7"], "valid layer.index is 0..1"),
        (["model=local", "layer.tensor=nope"], "has no tensor 'nope'"),
        (["model=local", "metrics.names=[msd,entropy]"], "unknown metric"),
        (["model=local", "steps=list", "steps.values=[0,5]"], r"steps [5] are not in the series"),
        (["model=local", "variant=filtered"], "variant='filtered' is not valid; valid: one of standard"),
        (["layer=mlp_out", "layer.index=9"], "valid layer.index is 0..3"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, fork_series, compose_config, overrides, message):
    """In-process (the command line's exit code for these errors is the test above's)."""
    from garden.errors import GardenError
    from garden.tasks import run

    if "model=local" in overrides:
        overrides.append(f"model.path={fork_series}")
    cfg = compose_config(*overrides, *in_process(tmp_path))
    with pytest.raises(GardenError, match=re.escape(message)):
        run(cfg, output_dir=tmp_path / "out")
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was started
    assert not (tmp_path / "data" / "series").exists()  # nothing was trained


def in_process(tmp_path) -> list[str]:
    """The overrides `run_garden` adds, for a `run(cfg)` in the test's own process."""
    return [
        f"paths.data_dir={tmp_path}/data",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "progress=false",
    ]


def run_in_process(compose_config, tmp_path, *overrides: str, out: str = "out"):
    """`run(cfg)` in the test's process (for tests whose subject is not the command line itself)."""
    from garden.tasks import run

    return run(compose_config(*overrides, *in_process(tmp_path)), output_dir=tmp_path / out)


def test_corrupt_step_fails_the_run_naming_the_step(tmp_path, fork_series, compose_config):
    from garden.errors import GardenError

    broken = tmp_path / "broken"
    shutil.copytree(fork_series, broken)
    (broken / "step16" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(GardenError, match=re.escape("step 16: unreadable safetensors header")) as failed:
        run_in_process(compose_config, tmp_path, "model=local", f"model.path={broken}")
    assert str(broken / "step16") in str(failed.value)
    _, found = runs(tmp_path)  # found while looking for duplicated steps (before the run), or in the run
    assert all(r.info.status == "FAILED" for r in found)


def test_missing_step_folder_weights(tmp_path, fork_series, compose_config):
    from garden.errors import GardenError

    broken = tmp_path / "holes"
    shutil.copytree(fork_series, broken)
    (broken / "step12" / "model.safetensors").unlink()
    with pytest.raises(GardenError, match="step 12: no weights in"):
        run_in_process(compose_config, tmp_path, "model=local", f"model.path={broken}")
    _, found = runs(tmp_path)
    assert all(r.info.status != "FINISHED" for r in found)


def test_bin_series_gives_the_same_numbers_as_safetensors(tmp_path, fork_series, compose_config):
    from safetensors.torch import load_file

    as_bin = tmp_path / "bin"
    for step_dir in sorted(fork_series.glob("step*")):
        (as_bin / step_dir.name).mkdir(parents=True)
        torch.save(load_file(step_dir / "model.safetensors"), as_bin / step_dir.name / "pytorch_model.bin")
    run_in_process(compose_config, tmp_path, "model=local", f"model.path={fork_series}", "metrics=minimal")
    run_in_process(
        compose_config, tmp_path, "model=local", f"model.path={as_bin}", "metrics=minimal", out="o2"
    )
    _, (r1, r2) = runs(tmp_path)
    for key in ("alpha", "final_msd", "final_bimodality_coefficient", "bifurcation_step"):
        key = f"summary/{key}"
        assert r1.data.metrics[key] == pytest.approx(r2.data.metrics[key], rel=1e-12), key


def test_sigterm_mid_extraction_ends_the_run_killed_and_a_rerun_resumes(tmp_path, compose_config, caplog):
    """What `timeout`, `kill` and SLURM send: the open MLflow run ends KILLED, never RUNNING."""
    import os
    import signal
    import sys
    import time

    gen = torch.Generator().manual_seed(0)
    states = {
        s: {"embed_out.weight": (torch.randn(1000, 600, generator=gen) * 0.02).half()} for s in range(16)
    }
    series = write_series(tmp_path / "series", states)
    # Tiny chunks make the pass slow enough (about 2 s) to be caught in the middle.
    command = [sys.executable, "-m", "garden", "progress=false", "model=local", f"model.path={series}",
               "extract.unit_axis=null", "extract.chunk_size=1024", "metrics=minimal",
               f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"paths.data_dir={tmp_path}/data",
               f"hydra.run.dir={tmp_path}/out"]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((tmp_path / "data").rglob("step1.npz")):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    assert "terminated (SIGTERM)" in stderr
    _, (run,) = runs(tmp_path)
    assert run.info.status == "KILLED"
    finished = list((tmp_path / "data").rglob("step*.npz"))
    assert 0 < len(finished) < 16  # stopped in the middle of the extraction

    # kill -9 cannot be caught: the run stays RUNNING until the next run on the store ends it KILLED.
    for record in (tmp_path / "data").rglob("step*.npz"):
        record.unlink()
    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    while time.monotonic() < deadline and not list((tmp_path / "data").rglob("step1.npz")):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert sorted(r.info.status for r in runs(tmp_path)[1]) == ["KILLED", "RUNNING"]

    # The next run on the store (in-process: the stale run's cleanup is the subject) ends it KILLED.
    run_in_process(compose_config, tmp_path, *[arg for arg in command[3:] if not arg.startswith("hydra.")])
    assert "left RUNNING by a process that died" in caplog.text
    by_status = sorted((r.info.status, r.data.tags.get("garden.end_reason", "")) for r in runs(tmp_path)[1])
    assert by_status == [
        ("FINISHED", ""), ("KILLED", ""), ("KILLED", "its process died without ending it"),
    ]  # fmt: skip


def test_progress_off_a_terminal_is_a_few_log_lines_not_bar_frames(tmp_path, fork_series):
    """progress=true (the default) with the output going to a file or a pipe, as a cluster job's does:
    no carriage-return frames, a few progress lines in the job's log instead."""
    command = [sys.executable, "-m", "garden", "model=local", f"model.path={fork_series}", "metrics=minimal",
               "figures=false", f"paths.data_dir={tmp_path}/data", f"tracking.uri=sqlite:///{tmp_path}/m.db",
               f"hydra.run.dir={tmp_path}/out"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "\r" not in output
    progress = re.findall(r"extract embed_out\.weight: (\d+)/(\d+) steps in", output)
    assert 1 <= len(progress) <= 5 and progress[-1] == (str(len(FORK_STEPS)), str(len(FORK_STEPS)))
    # A line before each wait of more than a few seconds: the imports and checks, the MLflow store, the
    # analysis and figures (the extraction's own lines are above).
    said = [line for line in output.splitlines() if "[garden]" in line]
    waits = ["checking the input, then opening the series", "opening the MLflow run", "is open: it shows",
             "extract embed_out.weight: 9 of 9 steps computed", "analysing embed_out.weight:", "finished:"]
    positions = []
    for wait in waits:
        found = [i for i, line in enumerate(said) if wait in line]
        assert found, f"no line {wait!r} in the job's output"
        positions.append(found[0])
    assert positions == sorted(positions)  # in this order


def test_a_logged_bar_reports_at_a_few_fractions(caplog, monkeypatch):
    """A loop that lasts logs a line at 25, 50, 75 and 100%; one that ends at once (records read back
    from the cache) only its end; progress=false nothing."""
    import logging

    from garden import progress

    def counted(quiet_seconds: float) -> list[str]:
        monkeypatch.setattr(progress, "QUIET_SECONDS", quiet_seconds)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="garden"):
            for _ in progress.LoggedBar(range(1000), "count", "item", enabled=True, total=None):
                pass
            for _ in progress.LoggedBar(range(10), "quiet", "item", enabled=False, total=None):
                pass
        return [r.getMessage().split(" in ")[0] for r in caplog.records]

    assert counted(0.0) == [f"count: {n}/1000 items" for n in (250, 500, 750, 1000)]
    assert counted(3600.0) == ["count: 1000/1000 items"]


def test_summary_json_is_strict_json_with_null_events_and_whole_steps(tmp_path, fork_series, compose_config):
    """As the README says: an event looked for and not reached is null (not left out), an undefined value
    is null (not NaN), steps and counts are integers."""
    import json
    import math

    from garden.analysis import plain_summary

    summary = {"bifurcation_step": 8.0, "n_steps": 9.0, "alpha": 1.5, "final_msd": math.nan,
               "msd_break1_step": 40.0, "unit_bifurcation_to_perplexity_drop": -320.0}  # fmt: skip
    tags = {"garden.bifurcation": "detected", "garden.stationary": "none", "garden.unit_bifurcation": "none"}
    assert plain_summary(summary, tags) == {
        "bifurcation_step": 8, "n_steps": 9, "alpha": 1.5, "final_msd": None, "msd_break1_step": 40,
        "unit_bifurcation_to_perplexity_drop": -320, "stationary_step": None, "unit_bifurcation_step": None,
    }  # fmt: skip
    run_in_process(compose_config, tmp_path, "model=local", f"model.path={fork_series}", "figures=false")
    text = (tmp_path / "out" / "summary.json").read_text()

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    written = json.loads(text, parse_constant=refuse)["summary"]
    assert written["bifurcation_step"] == 8 and isinstance(written["n_steps"], int)
    assert "stationary_step" in written and "unit_bifurcation_step" in written


def test_a_relative_sqlite_store_is_printed_with_its_absolute_path(tmp_path, monkeypatch):
    """`sqlite:///mlflow.db` run from another folder opens another, empty store: the printed command
    names the store the run is in."""
    from garden.record import absolute_store

    monkeypatch.chdir(tmp_path)
    assert absolute_store("sqlite:///mlflow.db") == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert absolute_store("sqlite:////already/absolute.db") == "sqlite:////already/absolute.db"
    assert absolute_store("http://mlflow.example:5000") == "http://mlflow.example:5000"
