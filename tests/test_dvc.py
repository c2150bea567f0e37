"""The DVC pipeline on a throwaway clone of the study, shrunk: `dvc repro`, a no-op second repro,
`dvc exp run -S` through Hydra composition, metrics and the models x variants matrix."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import SHRUNK_TINY
from garden.settings import resolve
from garden.tiny import tiny_series_dir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TRACING = {"PYTHONPATH": str(ROOT / "tests" / "stage_trace")}
GIT_ENV = {"GIT_AUTHOR_NAME": "garden", "GIT_AUTHOR_EMAIL": "garden@localhost",
           "GIT_COMMITTER_NAME": "garden", "GIT_COMMITTER_EMAIL": "garden@localhost"}  # fmt: skip


def sh(work: Path, *command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # `python` in dvc.yaml's commands is the environment's, as with an activated virtualenv.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    done = subprocess.run(list(command), cwd=work, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **GIT_ENV, "PATH": path, **(env or {})})  # fmt: skip
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def dvc(work: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return sh(work, str(Path(sys.executable).parent / "dvc"), *args, env=env)


@pytest.fixture(scope="module")
def study(tmp_path_factory, small_corpus):
    """The repository's pipeline files in a fresh git repo; params.yaml composed with a shrunk model."""
    work = tmp_path_factory.mktemp("study")
    leave_out = shutil.ignore_patterns("__pycache__", "*.pyc", "tmp")
    for name in ("src", "conf", ".dvc"):
        shutil.copytree(ROOT / name, work / name, ignore=leave_out)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "pyproject.toml"):
        shutil.copy(ROOT / name, work / name)
    # One matrix item (the standard series the `series` stage trains); where another variant's item trains
    # is checked without running it (test_a_matrix_item_trains_another_series_outside_the_outputs).
    overrides = [*SHRUNK_TINY, f"corpus.path={small_corpus}", "progress=false", "study.variants=[standard]",
                 'study.scan_shards=["0:1","1:"]']  # fmt: skip
    sh(work, sys.executable, "-m", "garden.stages", "params", *overrides)
    sh(work, "git", "init", "-q")
    sh(work, "git", "add", "-A")
    sh(work, "git", "commit", "-qm", "study")
    # The first repro runs the stages with their garden function calls recorded (tests/stage_trace/),
    # but for the two that train (tracing slows Python down): `series` is traced when it reruns.
    traced = {**TRACING, "GARDEN_TRACE_DIR": str(work / "trace"),
              "GARDEN_TRACE_STAGES": "corpus,extract,metrics,evaluate,report,scan"}  # fmt: skip
    first = dvc(work, "repro", env=traced)
    return work, overrides, first


def tiny_folder(work: Path, variant: str) -> Path:
    """The keyed folder garden gives the study's tiny series of this variant (relative to `work`)."""
    params = resolve(OmegaConf.load(work / "params.yaml"))
    return tiny_series_dir(params.model, params.corpus, Path("study"), variant)


def visible(folder: Path) -> list[Path]:
    """A folder's entries without the lock files garden.cache keeps beside what it produces."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def runs(work: Path):
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    return client, client.search_runs([client.get_experiment_by_name("garden").experiment_id])


def test_repro_runs_every_stage_and_records_the_study(study):
    work, _, first = study
    for stage in ("corpus", "series", "extract", "metrics", "evaluate", "report", "sweep@tiny-standard",
                  "compare", "scan@0:1", "scan@1:", "scan_map"):  # fmt: skip
        assert f"Running stage '{stage}'" in first.stdout
    (trained,) = visible(work / "study" / "series")
    assert trained == work / tiny_folder(work, "standard") and (trained / "series.json").is_file()
    steps = pd.read_csv(work / "study" / "metrics" / "tables" / "steps.csv")
    assert list(steps["step"]) == [0, 1, 2, 4, 8, 16, 24, 32, 40]
    assert {"msd", "bimodality_coefficient", "bimodal_unit_fraction"} <= set(steps.columns)
    assert (work / "study" / "metrics" / "tables" / "units.csv").is_file()
    assert "perplexity" in pd.read_csv(work / "study" / "evaluation" / "tables" / "evaluation.csv")
    headline = json.loads((work / "study" / "metrics.json").read_text())
    assert set(headline) == {"bifurcation_step", "unit_bifurcation_step", "final_bimodal_unit_fraction",
                             "stationary_step", "alpha", "final_perplexity"}  # fmt: skip
    assert headline["final_perplexity"] > 1 and headline["alpha"] > 0
    assert 0 <= headline["final_bimodal_unit_fraction"] <= 1
    shown = json.loads(dvc(work, "metrics", "show", "--json").stdout)[""]["data"]
    shown = shown["study/metrics.json"]["data"]
    for key, value in headline.items():  # every key shown, an absent one as what its absence means
        assert isinstance(value, float) or value in ("none", "not computed"), (key, value)
        assert shown[key] == value, key

    client, found = runs(work)
    (report,) = [r for r in found if r.data.tags.get("garden.pipeline") == "dvc"]
    assert report.info.status == "FINISHED" and report.info.run_name == "tiny/standard/unembedding"
    assert report.data.metrics["summary/final_perplexity"] == pytest.approx(headline["final_perplexity"])
    assert report.data.tags["garden.unit_bifurcation"] in ("detected", "none")
    assert len(client.get_metric_history(report.info.run_id, "units/bimodal_unit_fraction")) == len(steps)
    assert len(client.get_metric_history(report.info.run_id, "diffusion/msd")) == len(steps)
    artifacts = {a.path for a in client.list_artifacts(report.info.run_id)}
    assert {"tables", "figures", "summary.json"} <= artifacts


def test_the_scan_shards_merge_into_one_map_of_the_studys_series(study):
    """The scan stage's two shards (block 0 with the embeddings, block 1) and scan_map's merge: every
    tensor once, the shards' MLflow runs keyed in the merged table, the map's figures for dvc plots."""
    work, _, _ = study
    merged = pd.read_csv(work / "study" / "scan_map" / "tables" / "scan_summary.csv")
    assert len(merged) == 2 + 2 * 4 and merged["tensor"].is_unique
    shards = {json.loads((work / "study" / "scan" / name / "run.json").read_text())["run_id"]
              for name in ("0:1", "1:")}  # fmt: skip
    assert set(merged["run_id"]) == shards
    assert set(merged.loc[merged["block"] == 1, "run_id"]) == {
        json.loads((work / "study" / "scan" / "1:" / "run.json").read_text())["run_id"]
    }
    assert (work / "study" / "scan_map" / "figures" / "scan_fork_map.png").is_file()
    _, found = runs(work)
    (merge,) = [r for r in found if r.info.run_name == "compare-scan"]
    assert merge.data.tags["garden.scan_tensors"] == "10"


def test_matrix_runs_each_item_reusing_the_trained_series(study):
    work, _, _ = study
    client, found = runs(work)
    record = json.loads((work / "study" / "sweep" / "tiny-standard" / "run.json").read_text())
    item = client.get_run(record["run_id"])
    # Its records are the study's stages': it computed nothing, and says so (marked where an earlier run of
    # the same job is in the store: the study's report run, when the pipeline ran it first).
    assert item.info.status == "FINISHED" and item.data.tags["garden.cached"] == "all"
    marked = "(cached) " if item.data.tags.get("garden.reused_run") else ""
    assert item.info.run_name == f"{marked}tiny/standard/unembedding"
    assert item.data.params["model.path"] == str(tiny_folder(work, "standard"))  # the series stage's
    table = pd.read_csv(work / "study" / "compare" / "comparison.csv")
    assert list(table["run_name"]) == ["tiny/standard/unembedding"]
    assert any(r.info.run_name == "compare" for r in found)


def test_a_matrix_item_trains_another_series_outside_the_outputs(tmp_path, monkeypatch):
    """An item whose series the `series` stage did not train gets a keyed folder under study/trained/
    (not a DVC output), so rerunning the item never trains it twice."""
    from garden.stages import compose_study, sweep_config

    monkeypatch.chdir(tmp_path)
    cfg = resolve(compose_study(SHRUNK_TINY))
    item = sweep_config(cfg, "tiny", "deduped")
    deduped = tiny_series_dir(cfg.model, cfg.corpus, Path("study"), "deduped")
    assert item.model.path == str(Path("study") / "trained" / deduped.name)
    assert deduped.name.startswith("tiny-deduped-") and item.variant == "deduped"


def test_plots_show_writes_a_page_that_renders_offline(study):
    """.dvc/config names .dvc/plots/offline.html: Vega, Vega-Lite and Vega-Embed inlined, no CDN."""
    work, _, _ = study
    done = dvc(work, "plots", "show")
    assert "failed" not in (done.stdout + done.stderr).lower(), done.stdout + done.stderr
    page = (work / "dvc_plots" / "index.html").read_text()
    sources = re.findall(r"<script[^>]*\bsrc\s*=\s*[\"']([^\"']+)", page)
    assert sources == [], sources  # every script is in the page itself
    assert page.count("vegaEmbed(") >= 4 and "cdn.jsdelivr" not in page  # the four plots of dvc.yaml


def test_second_repro_does_nothing(study):
    work, _, _ = study
    _, before = runs(work)
    again = dvc(work, "repro")
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date." in again.stdout
    assert len(runs(work)[1]) == len(before)


def test_an_edit_to_one_module_reruns_only_the_stages_that_run_it(study):
    """Each stage depends on the modules it runs: an edit to the MLflow record reruns the report (and
    the matrix, whose items run the whole job), not the training, extraction or evaluation."""
    work, _, _ = study
    module = work / "src" / "garden" / "record.py"
    original = module.read_text()
    module.write_text(original + "\n# an edit\n")
    try:
        status = json.loads(dvc(work, "status", "--json").stdout)
    finally:
        module.write_text(original)
    # (the scan shards run the record's functions too: each is a whole task=scan job)
    rerun = {stage for stage in status if not stage.startswith("sweep@")}
    assert rerun == {"report", "scan@0:1", "scan@1:"}, status


def test_exp_run_set_param_composes_with_hydra_and_reruns_only_what_depends_on_it(study):
    work, overrides, _ = study
    sh(work, "git", "add", "-A")
    sh(work, "git", "commit", "-qm", "first repro")
    settings = [arg for o in [*overrides, "tracking.run_name=renamed"] for arg in ("-S", o)]
    done = dvc(work, "exp", "run", "-n", "renamed-report", *settings)
    assert "Running stage 'report'" in done.stdout
    assert done.stdout.count("Running stage") == 1, done.stdout  # only the stage that reads tracking.*
    params = (work / "params.yaml").read_text()
    assert "run_name: renamed" in params and "steps: 40" in params  # composed from conf/ + every -S
    shown = json.loads(dvc(work, "exp", "show", "--json").stdout)
    names = [exp.get("name") for entry in shown for exp in entry.get("experiments") or []]
    assert "renamed-report" in names
    _, found = runs(work)
    assert any(r.info.run_name == "renamed" and r.data.tags.get("garden.pipeline") == "dvc" for r in found)


def test_series_stage_keeps_only_the_current_series(study):
    """The `series` output persists (an interrupted training resumes there); another config's series
    left in it is removed, the current complete one is reused, not retrained."""
    work, _, _ = study
    (current,) = visible(work / "study" / "series")
    finished_at = (current / "series.json").stat().st_mtime_ns
    stale = work / "study" / "series" / "tiny-000000000000"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"old")
    sh(work, sys.executable, "-m", "garden.stages", "series")
    assert visible(work / "study" / "series") == [current]
    assert (current / "series.json").stat().st_mtime_ns == finished_at


def test_the_series_stage_links_the_tiny_series_the_cli_already_trained(tmp_path, monkeypatch):
    """`make run` then `dvc repro`: the same keyed series under data/ is linked into study/series, not
    trained a second time."""
    from garden import stages, tiny

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GARDEN_DATA_DIR", raising=False)
    cfg = resolve(stages.compose_study([*SHRUNK_TINY, "progress=false"]))
    name = tiny_series_dir(cfg.model, cfg.corpus, Path("study")).name
    trained = tmp_path / "data" / "series" / name
    (trained / "step0").mkdir(parents=True)
    (trained / "step0" / "model.safetensors").write_bytes(b"weights")
    (trained / tiny.COMPLETE_MARKER).write_text("{}")

    def no_training(*args, **kwargs):
        raise AssertionError("the tiny series was trained again")

    monkeypatch.setattr(tiny, "train_series", no_training)
    stages.series(cfg, Path("study") / "series")
    linked = tmp_path / "study" / "series" / name / "step0" / "model.safetensors"
    assert linked.read_bytes() == b"weights"
    assert os.path.samefile(linked, trained / "step0" / "model.safetensors")  # a hard link, not a copy


@pytest.mark.parametrize("stage", ["corpus", "series", "extract", "metrics", "evaluate", "report", "scan"])
def test_each_stage_depends_on_every_garden_module_it_runs(study, stage):
    """dvc.yaml lists each stage's code deps by hand; they must cover every garden file a function ran in
    while the stage ran (recorded by tests/stage_trace/sitecustomize.py: in the first repro, and for
    `series`, which trains there, in a rerun that finds the series trained)."""
    import garden

    work, _, _ = study
    spec = yaml.safe_load((work / "dvc.yaml").read_text())["stages"][stage]
    if stage == "series":
        traced = {**TRACING, "GARDEN_TRACE_DIR": str(work / "trace"), "GARDEN_TRACE_STAGES": "series"}
        sh(work, sys.executable, "-m", "garden.stages", *spec["cmd"].split()[3:], env=traced)
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec["deps"]]
    records = sorted((work / "trace").glob(f"{stage}-*.json"))
    assert records, f"the repro left no trace of stage {stage!r}"
    source = Path(garden.__file__).resolve().parents[2]  # the checkout the stages imported garden from
    files = [Path(f).resolve() for record in records for f in json.loads(record.read_text())]
    ran = {f.relative_to(source).as_posix() for f in files if f.is_relative_to(source / "src")}
    assert any(f.startswith("src/garden/settings/") for f in ran)  # the trace saw the stage's own code
    missing = sorted(f for f in ran if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
    assert not missing, f"dvc.yaml stage {stage!r}: add to deps {missing}"
