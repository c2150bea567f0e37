"""The offline tiny series: trained by garden, Hugging Face format, deterministic, resumable."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import SHRUNK_TINY, run_garden
from garden import tiny
from garden.config import config_dir

pytestmark = pytest.mark.slow


def small_model(corpus, steps=12, interval=4):
    model = OmegaConf.load(config_dir() / "model" / "tiny.yaml")
    model.architecture.update(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model.train.update(steps=steps, interval=interval, batch_size=4, seq_len=16, seed=7)
    corpus_cfg = OmegaConf.load(config_dir() / "corpus" / "shakespeare.yaml")
    corpus_cfg.path = str(corpus)
    return model, corpus_cfg


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
    assert [r.info.run_name for r in found] == ["tiny/standard/unembedding"] * 2
    assert all(r.info.status == "FINISHED" for r in found)
    steps = sorted(m.step for m in client.get_metric_history(found[0].info.run_id, "msd"))
    assert steps == [0, 1, 2, 4, 8, 16, 24, 32, 40]


def test_the_series_key_follows_the_corpus_content_not_its_place(tmp_path, compose_config):
    from garden.tiny import series_fingerprint

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "text.txt").write_text("to be or not to be\n")
    cfg = compose_config(f"corpus.path={tmp_path}/a")
    first = series_fingerprint(cfg.model, cfg.corpus)
    (tmp_path / "a").rename(tmp_path / "b")
    moved = compose_config(f"corpus.path={tmp_path}/b")
    assert series_fingerprint(moved.model, moved.corpus) == first
    (tmp_path / "b" / "text.txt").write_text("to be or not to be, that is the question\n")
    assert series_fingerprint(moved.model, moved.corpus) != first
