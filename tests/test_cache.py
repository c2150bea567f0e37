"""garden.cache: keys that follow content, config and code; atomic writes; locks; damaged records."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import ArraySeries, planted_fork, write_series
from garden import cache
from garden.evaluation.stage import EvaluationPlan
from garden.extract import ExtractionPlan, extract
from garden.series import LocalSeries


@pytest.fixture
def changed_source(monkeypatch):
    """Pretend one producing module's source changed (as after a bug fix), for the rest of the test."""
    original = cache._source_of

    def change(module: str) -> None:
        def patched(producer: str) -> str:
            source = original(producer)
            return source + "\n# fixed\n" if producer.partition(":")[0] == module else source

        monkeypatch.setattr(cache, "_source_of", patched)
        cache.code_version.cache_clear()

    yield change
    cache.code_version.cache_clear()


def _keys(compose_config) -> dict[str, str]:
    from garden.cooccurrence import run_config_hash
    from garden.tiny import series_fingerprint

    cfg = compose_config()
    plan = ExtractionPlan(tensor="embed_out.weight", steps=(0, 1, 2), reference_step=0)
    evaluation = EvaluationPlan(("perplexity",), (0, 1), "cpu", "float32", 4, 16, None, None, 8, 0)
    return {
        "tiny": series_fingerprint(cfg.model, cfg.corpus),
        "extract": plan.cache_key("local:/x"),
        "evaluate": evaluation.cache_key("local:/x", "data", "final"),
        "cooccurrence": run_config_hash(compose_config("experiment=cooccurrence").cooccurrence),
    }


@pytest.mark.parametrize(
    "module, kind",
    [
        ("garden.tiny", "tiny"),  # the trainer
        ("garden.extract.kernel", "extract"),  # the per-step statistics
        ("garden.extract.records", "extract"),  # the record files
        ("garden.extract.plan", "extract"),  # the settings
        ("garden.dip_kernels", "extract"),  # the per-unit dip kernel
        ("garden.evaluation.perplexity", "evaluate"),  # a scorer
        ("garden.cooccurrence", "cooccurrence"),
    ],
)
def test_a_change_to_the_producing_code_changes_only_its_own_keys(
    compose_config, changed_source, module, kind
):
    before = _keys(compose_config)
    changed_source(module)
    after = _keys(compose_config)
    assert {k for k in before if before[k] != after[k]} == {kind}


def test_every_producer_is_covered_and_importable():
    from garden import dip, dip_kernels, tiny
    from garden.evaluation import perplexity, stability
    from garden.evaluation import stage as evaluation_stage
    from garden.extract import kernel, plan, records, stream

    for kind in cache.PRODUCERS:
        assert len(cache.code_version(kind)) == 12
    covered = {m.partition(":")[0] for producers in cache.PRODUCERS.values() for m in producers}
    for module in (dip, dip_kernels, kernel, plan, records, tiny, perplexity, stability, evaluation_stage):
        assert module.__name__ in covered
    # The loop over the steps decides no recorded number: changing it keeps the records.
    assert stream.__name__ not in covered
    assert set(cache.version_tags("extract", "tiny")) == {"garden.cache.extract", "garden.cache.tiny"}


def test_atomic_writes_leave_no_temporary_and_clean_up_on_failure(tmp_path):
    target = tmp_path / "a" / "record.json"
    cache.write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cache.atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"x": 1}
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]


def test_a_damaged_record_is_recomputed_with_a_warning(tmp_path, caplog):
    path = tmp_path / "step3.npz"
    with open(path, "wb") as handle:
        np.savez(handle, a=np.arange(1000))
    path.write_bytes(path.read_bytes()[:300])  # a torn write
    with pytest.raises(zipfile.BadZipFile):
        np.load(path)
    with caplog.at_level(logging.WARNING, logger="garden"):
        assert cache.read_or_none(path, lambda p: dict(np.load(p))) is None
    assert "unreadable cache record" in caplog.text and str(path) in caplog.text
    assert not path.exists()


def test_a_torn_extraction_record_is_recomputed_not_fatal(tmp_path, caplog):
    steps = [0, 1, 2, 4]
    series = ArraySeries({s: {"w": v} for s, v in planted_fork(steps, onset=2, n=2000).items()})
    plan = ExtractionPlan(tensor="w", steps=tuple(steps), reference_step=0)
    first = extract(series, plan, tmp_path, progress=False)
    record = next((tmp_path / plan.cache_key(series.identity) / "steps").glob("step2.npz"))
    record.write_bytes(record.read_bytes()[:200])
    series.reads.clear()
    with caplog.at_level(logging.WARNING, logger="garden"):
        again = extract(series, plan, tmp_path, progress=False)
    assert "unreadable extraction record" in caplog.text
    assert 2 in series.reads
    np.testing.assert_array_equal(first.table["msd"], again.table["msd"])


def test_a_second_job_waits_for_the_folder_and_says_so(tmp_path, caplog):
    folder = tmp_path / "extract" / "key"
    held, release = threading.Event(), threading.Event()

    def first_job():
        with cache.producing(folder, "the extraction"):
            held.set()
            release.wait(5)

    worker = threading.Thread(target=first_job)
    worker.start()
    held.wait(5)
    threading.Timer(0.3, release.set).start()
    began = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="garden"), cache.producing(folder, "the extraction"):
        waited = time.perf_counter() - began
    worker.join()
    assert waited >= 0.25
    assert "waiting for another job producing the extraction" in caplog.text


def _write_weights(folder, values: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"embed_out.weight": values.contiguous()}, str(folder / "model.safetensors"))


def test_local_content_ids_follow_the_bytes_not_the_path_or_the_date(tmp_path):
    torch.manual_seed(0)
    a, b = torch.randn(30, 8), torch.randn(30, 8)
    for step, values in ((0, a), (1, b), (2, a)):
        _write_weights(tmp_path / "s" / f"step{step}", values)
    series = LocalSeries(tmp_path / "s", memo_dir=tmp_path / "memo")
    ids = {s: series.fingerprint(s, "embed_out.weight") for s in (0, 1, 2)}
    assert ids[0] == ids[2] != ids[1]  # same bytes, same id, whatever the file's name or date
    whole = {s: series.checkpoint_content_id(s) for s in (0, 1, 2)}
    assert whole[0] == whole[2] != whole[1]

    # The probe of issue 11: step0's weights copied over step1, keeping the date (cp -p).
    shutil.copy2(
        tmp_path / "s" / "step0" / "model.safetensors", tmp_path / "s" / "step1" / "model.safetensors"
    )
    fresh = LocalSeries(tmp_path / "s", memo_dir=tmp_path / "memo")  # a later run, memo read from disk
    assert fresh.fingerprint(1, "embed_out.weight") == ids[0]
    assert fresh.checkpoint_content_id(1) == whole[0]
    assert json.loads(next((tmp_path / "memo").iterdir()).read_text())  # remembered between runs


def test_an_extraction_follows_weights_copied_over_a_step(tmp_path):
    steps = [0, 1, 2, 4]
    values = planted_fork(steps, onset=2, n=64 * 30)
    root = write_series(
        tmp_path / "s", {s: {"embed_out.weight": v.reshape(64, 30)} for s, v in values.items()}
    )
    plan = ExtractionPlan(tensor="embed_out.weight", steps=tuple(steps), reference_step=0, unit_axis=None)
    before = extract(LocalSeries(root, memo_dir=tmp_path / "memo"), plan, tmp_path / "x", progress=False)
    shutil.copy2(root / "step0" / "model.safetensors", root / "step2" / "model.safetensors")
    after = extract(LocalSeries(root, memo_dir=tmp_path / "memo"), plan, tmp_path / "x", progress=False)
    assert before.table["msd"].iloc[2] > 0
    assert after.table["msd"].iloc[2] == 0.0  # step 2 now holds step 0's weights
    assert after.table["msd"].iloc[3] == before.table["msd"].iloc[3]


def test_evaluation_scores_again_a_checkpoint_whose_weights_were_replaced(
    tmp_path, compose_config, small_corpus
):
    """Issue 11's probe: step0's weights copied over step2 (keeping the date); a rerun with the same
    data dir reports step 0's perplexity for step 2, as a fresh data dir would, not the cached one."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from garden.evaluation.stage import evaluate, plan_evaluation
    from garden.tiny import train_tokenizer

    text = "\n".join(p.read_text() for p in sorted(small_corpus.iterdir()))
    tokenizer = train_tokenizer(text.splitlines(), 300)
    root = tmp_path / "series"
    for step in (0, 1, 2):
        torch.manual_seed(step)
        config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32,
                               max_position_embeddings=64)  # fmt: skip
        GPTNeoXForCausalLM(config).save_pretrained(root / f"step{step}")
        tokenizer.save_pretrained(root / f"step{step}")
    (tmp_path / "eval.txt").write_text(text[:20000])
    cfg = compose_config(
        "model=local", f"model.path={root}", "evaluation=perplexity", "evaluation.stages=[perplexity]",
        "evaluation.text.source=file", f"evaluation.text.path={tmp_path}/eval.txt", "evaluation.seq_len=16",
        "evaluation.max_windows=8", "evaluation.steps.select=all", f"paths.data_dir={tmp_path}/data",
    )  # fmt: skip

    def perplexities() -> list[float]:
        series = LocalSeries(root, memo_dir=tmp_path / "data" / "content-ids")
        plan = plan_evaluation(cfg, series.steps())
        return (
            evaluate(series, plan, cfg, tmp_path / "data" / "evaluate", progress=False)
            .table["perplexity"]
            .tolist()
        )

    before = perplexities()
    assert len(set(before)) == 3
    shutil.copy2(root / "step0" / "model.safetensors", root / "step2" / "model.safetensors")
    after = perplexities()
    assert after[2] == pytest.approx(before[0]) and after[:2] == before[:2]
