"""The offline tiny series: trained by garden, Hugging Face format, deterministic, resumable."""

from __future__ import annotations

import math
import re

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import SHRUNK_TINY, run_garden
from garden import tiny
from garden.config import config_dir

pytestmark = pytest.mark.slow


def small_model(corpus, steps=12, interval=4):
    """The tiny model and corpus settings, shrunk, as a job's Settings hold them."""
    from garden.settings import CorpusSettings, ModelSettings, read_section

    model = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / "tiny.yaml"))
    model["architecture"].update(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model["train"].update(steps=steps, interval=interval, batch_size=4, seq_len=16, seed=7)
    corpus_cfg = OmegaConf.to_container(OmegaConf.load(config_dir() / "corpus" / "shakespeare.yaml"))
    corpus_cfg["path"] = str(corpus)
    return read_section(ModelSettings, model, "model."), read_section(CorpusSettings, corpus_cfg, "corpus.")


def weights(folder, step):
    return load_file(folder / f"step{step}" / "model.safetensors")


def test_same_seed_same_weights_and_loadable(tmp_path, small_corpus):
    model, corpus_cfg = small_model(small_corpus)
    a = tiny.ensure_tiny_series(model, corpus_cfg, tmp_path / "a", "cpu", progress=False)
    b = tiny.ensure_tiny_series(model, corpus_cfg, tmp_path / "b", "cpu", progress=False)
    assert sorted(p.name for p in a.glob("step*")) == sorted(f"step{s}" for s in [0, 1, 2, 4, 8, 12])
    for step in (0, 12):
        wa, wb = weights(a, step), weights(b, step)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(weights(a, 0)["embed_out.weight"], weights(a, 12)["embed_out.weight"])
    assert set(tiny.tensor_names_on_disk(model)) == set(weights(a, 4))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(a / "step12")
    tokenizer = AutoTokenizer.from_pretrained(a / "step12")
    ids = tokenizer("the king walks in the garden", return_tensors="pt")["input_ids"]
    assert loaded(input_ids=ids).logits.shape == (1, ids.shape[1], 300)
    torch.testing.assert_close(loaded.get_output_embeddings().weight, weights(a, 12)["embed_out.weight"])


def test_the_series_is_byte_identical_whatever_threads_the_process_has(tmp_path, small_corpus):
    """A Hydra joblib worker runs torch on 1 thread, a shell on 2 (2 cores): the training pins
    model.train.threads, so both write the same bytes; trained on another pinned count, they differ."""
    from dataclasses import replace

    model, corpus_cfg = small_model(small_corpus, steps=24, interval=8)
    before = torch.get_num_threads()
    written = {}
    try:
        for process_threads, pinned in ((1, 2), (2, 2), (2, 1)):
            torch.set_num_threads(process_threads)
            settings = replace(model, train=replace(model.train, threads=pinned))
            folder = tmp_path / f"process{process_threads}-pinned{pinned}"
            tiny.train_series(settings, corpus_cfg, folder, tmp_path, torch.device("cpu"), progress=False)
            assert torch.get_num_threads() == process_threads  # the process gets its own count back
            checkpoints = folder.glob("step*/model.safetensors")
            written[process_threads, pinned] = {p.parent.name: p.read_bytes() for p in checkpoints}
    finally:
        torch.set_num_threads(before)
    assert len(written[1, 2]) == 7 and written[1, 2] == written[2, 2]  # steps 0, 1, 2, 4, 8, 16, 24
    assert written[2, 1]["step24"] != written[2, 2]["step24"]


def test_the_monitor_leaves_the_weights_alone_and_keys_the_series_only_when_it_stops(tmp_path, small_corpus):
    from dataclasses import replace

    model, corpus_cfg = small_model(small_corpus, steps=12, interval=4)
    written = {}
    for monitored in (True, False):
        folder = tmp_path / f"monitored-{monitored}"
        tiny.train_series(model, corpus_cfg, folder, tmp_path, torch.device("cpu"), progress=False,
                          monitored=monitored)  # fmt: skip
        written[monitored] = {p.parent.name: p.read_bytes() for p in folder.glob("step*/model.safetensors")}
    assert len(written[True]) == 6 and written[True] == written[False]
    key = tiny.series_fingerprint
    watched = replace(model, train=replace(model.train, every=5, patience=7, min_step=3))
    assert key(watched, corpus_cfg) == key(model, corpus_cfg)  # the monitor alone: the same series
    stopping = replace(model, train=replace(model.train, stop_on="stationary"))
    later = replace(model, train=replace(model.train, stop_on="stationary", min_step=3))
    assert len({key(model, corpus_cfg), key(stopping, corpus_cfg), key(later, corpus_cfg)}) == 3
    from garden.settings import MetricSettings

    stricter = MetricSettings(stationary_threshold=0.01)  # the live event's threshold is the offline one's
    assert key(stopping, corpus_cfg, metrics=stricter) != key(stopping, corpus_cfg)
    assert key(model, corpus_cfg, metrics=stricter) == key(model, corpus_cfg)  # no stop: no threshold


def test_a_stop_rule_ends_the_series_at_its_live_event_and_the_run_analyses_what_was_written(
    tmp_path, small_corpus, compose_config
):
    from mlflow.tracking import MlflowClient

    from garden.tasks import run

    overrides = [f"corpus.path={small_corpus}", *SHRUNK_TINY, "model.train.steps=400", "model.train.lr=3e-3",
                 "model.train.stop_on=stationary", "model.train.patience=2", "model.train.min_step=16",
                 f"paths.data_dir={tmp_path}/data", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                 "progress=false"]  # fmt: skip
    outcome = run(compose_config(*overrides), output_dir=tmp_path / "out")
    stopped = outcome.summary["stopped_step"]
    assert 16 < stopped < 400 and stopped % 8 == 0  # at a checkpoint, after min_step, before the end
    assert list(outcome.trajectory.steps)[-1] == stopped  # the series is what was written
    assert outcome.tags["garden.stop_reason"].startswith(f"stationary declared at step {int(stopped)}")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    logged = client.get_run(outcome.run_id).data
    assert logged.metrics["summary/stopped_step"] == stopped and "garden.stop_reason" in logged.tags
    assert logged.metrics["monitor/events"] >= 1
    # Both definitions on one run: the live event (declared at the stop) and the offline one on the series.
    assert outcome.summary["live_stationary_declared_step"] == stopped
    assert outcome.summary["live_stationary_step"] < stopped
    assert "stationary_step" in outcome.summary or outcome.tags["garden.stationary"] == "none"


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, small_corpus, monkeypatch):
    model, corpus_cfg = small_model(small_corpus)
    clean = tiny.ensure_tiny_series(model, corpus_cfg, tmp_path / "clean", "cpu", progress=False)

    original = tiny._save_checkpoint

    def crash_at_8(model_, tokenizer, folder, step, dtype):
        if step == 8:
            raise KeyboardInterrupt("simulated crash")
        original(model_, tokenizer, folder, step, dtype)

    monkeypatch.setattr(tiny, "_save_checkpoint", crash_at_8)
    with pytest.raises(KeyboardInterrupt):
        tiny.ensure_tiny_series(model, corpus_cfg, tmp_path / "crash", "cpu", progress=False)
    crashed = tiny.tiny_series_dir(model, corpus_cfg, tmp_path / "crash")
    assert not (crashed / tiny.COMPLETE_MARKER).exists() and not (crashed / "step8").exists()

    monkeypatch.setattr(tiny, "_save_checkpoint", original)
    resumed = tiny.ensure_tiny_series(model, corpus_cfg, tmp_path / "crash", "cpu", progress=False)
    assert (resumed / tiny.COMPLETE_MARKER).exists()
    for step in (8, 12):
        wa, wb = weights(clean, step), weights(resumed, step)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), step


def test_default_cli_on_a_shrunken_tiny_series(tmp_path, small_corpus, compose_config):
    """`python -m garden` with the tiny model shrunk by overrides: trains, analyses, logs; then a second
    job (in-process) reuses the trained series."""
    from mlflow.tracking import MlflowClient

    from garden.tasks import run

    done = run_garden(tmp_path, f"corpus.path={small_corpus}", *SHRUNK_TINY, f"hydra.run.dir={tmp_path}/o1")
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr  # what is trained, and where, before the training starts
    assert "not trained yet: a GPT-NeoX of 2 blocks, d_model 32, 2 heads, vocab 300" in said
    assert f"into {tmp_path}/data/series/tiny-" in said
    again = compose_config(f"corpus.path={small_corpus}", *SHRUNK_TINY, f"paths.data_dir={tmp_path}/data",
                           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "progress=false")  # fmt: skip
    run(again, output_dir=tmp_path / "o2")
    trained = [p for p in (tmp_path / "data" / "series").iterdir() if not p.name.startswith(".")]
    assert len(trained) == 1  # trained once, reused (beside it only its lock file)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("garden").experiment_id])
    # The second job computed nothing: its run says so in its name and tags, and names the run it reused.
    assert [r.info.run_name for r in found] == ["(cached) tiny/standard/unembedding",
                                                "tiny/standard/unembedding"]  # fmt: skip
    cached, first = found[0].data.tags, found[1].data.tags
    assert cached["garden.cached"] == "all" and cached["garden.reused_run"] == found[1].info.run_id
    assert cached["garden.reuse"] == "9 of 9 extracted steps, the series (trained before)"
    assert first["garden.cached"] == "none" and "garden.reused_run" not in first
    assert f"cached rerun of run {found[1].info.run_id}: nothing computed" in cached["mlflow.note.content"]
    assert all(r.info.status == "FINISHED" for r in found)
    steps = sorted(m.step for m in client.get_metric_history(found[0].info.run_id, "diffusion/msd"))
    assert steps == [0, 1, 2, 4, 8, 16, 24, 32, 40]

    # What the MLflow store holds of the CLI's run (the first one: runs are listed newest first).
    cli_run = found[1]
    assert cli_run.info.run_id != found[0].info.run_id and cli_run.info.start_time < found[0].info.start_time
    metrics, params = cli_run.data.metrics, cli_run.data.params
    groups = {key.split("/", 1)[0] for key in metrics}
    expected = {"dist", "diffusion", "bimodality", "units", "summary", "train", "system", "monitor"}
    assert groups == expected, groups
    # The monitor logged while the series trained; the record did not log those (key, step) pairs again.
    live = client.get_metric_history(cli_run.info.run_id, "diffusion/msd")
    assert sorted(m.step for m in live) == [0, 1, 2, 4, 8, 16, 24, 32, 40]
    renamed = {"dist/excess_kurtosis", "bimodality/gmm_minor_weight"}  # not `kurtosis`, not a param's name
    assert renamed | {"units/bimodal_unit_fraction"} <= set(metrics)
    # Every headline event is a metric, found or not (NaN: looked for, not reached, as its tag says; no
    # bar down to -1 in the charts).
    for event, tag in (("bifurcation_step", "garden.bifurcation"), ("stationary_step", "garden.stationary")):
        value = metrics[f"summary/{event}"]
        assert value > 0 if cli_run.data.tags[tag] == "detected" else math.isnan(value), event
    # The training loss and learning rate, per step, logged live: while the run was open.
    loss = client.get_metric_history(cli_run.info.run_id, "train/loss")
    assert sorted(m.step for m in loss) == list(range(1, 41))
    assert all(cli_run.info.start_time <= m.timestamp <= cli_run.info.end_time for m in loss)
    assert len(client.get_metric_history(cli_run.info.run_id, "train/lr")) == 40
    # The pass's progress is a system metric (drawn against time), not a chart on the training step.
    assert not any(key.startswith("extract/") for key in metrics)
    progress = client.get_metric_history(cli_run.info.run_id, "system/extract_checkpoints_done")
    assert [m.value for m in sorted(progress, key=lambda m: m.step)] == list(range(1, 10))
    # The second run found the series trained: the same history, read from its training log.
    reused = client.get_metric_history(found[0].info.run_id, "train/loss")
    live = {m.step: m.value for m in loss}
    assert {m.step: m.value for m in reused} == pytest.approx(live, abs=1e-6)  # train_log.csv: 6 decimals
    # The description, the overrides and the group choices; no param of a group the run does not use.
    description = cli_run.data.tags["mlflow.note.content"]
    sentence = description.splitlines()[0]  # the result first: MLflow shows a few lines before "Show more"
    assert sentence.startswith("**The tensor ") and "stationary" in sentence and sentence.endswith(".**")
    assert "tiny/standard/unembedding: the dynamics of embed_out.weight" in description
    assert "| pooled bifurcation |" in description
    # Its key figures, page-sized, shown by the description from the run's own artifacts.
    previews = {a.path for a in client.list_artifacts(cli_run.info.run_id, "previews")}
    assert previews == {"previews/forking_trajectories.png", "previews/displacement.png",
                        "previews/unit_forks.png"}  # fmt: skip
    for path in previews:
        assert f"(get-artifact?path={path.replace('/', '%2F')}&run_uuid={cli_run.info.run_id})" in description
    assert "series/train_log.csv" in {a.path for a in client.list_artifacts(cli_run.info.run_id, "series")}
    # Counts are params, not one-bar charts.
    assert params["run.n_steps"] == "9" and not any(k.startswith("summary/n_") for k in metrics)
    assert "Command: `python -m garden " in description and f"corpus.path={small_corpus}" in description
    assert "model.train.steps=40" in params["hydra.overrides"].split()
    assert params["hydra.choices.model"] == "tiny" and params["hydra.choices.evaluation"] == "none"
    assert params["resolved.device"] == "cpu" and params["resolved.output_dir"] == f"{tmp_path}/o1"
    unused = [key for key in params if key.startswith(("evaluation.", "cooccurrence.", "study."))]
    assert not unused, unused
    assert "corpus.path" in params and "model.train.steps" in params
    assert re.search(r"open it +mlflow ui --backend-store-uri sqlite:///\S+ --workers 1", said)
    page = r"then http://127\.0\.0\.1:5000/#/experiments/\d+/runs/\w+\?workflowType=machine_learning"
    assert re.search(page, said)  # the run's own page, on the Model training view


def test_the_series_key_follows_the_corpus_content_not_its_place(tmp_path, compose_settings):
    from garden.tiny import series_fingerprint

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "text.txt").write_text("to be or not to be\n")
    cfg = compose_settings(f"corpus.path={tmp_path}/a")
    first = series_fingerprint(cfg.model, cfg.corpus)
    (tmp_path / "a").rename(tmp_path / "b")
    moved = compose_settings(f"corpus.path={tmp_path}/b")
    assert series_fingerprint(moved.model, moved.corpus) == first
    (tmp_path / "b" / "text.txt").write_text("to be or not to be, that is the question\n")
    assert series_fingerprint(moved.model, moved.corpus) != first
