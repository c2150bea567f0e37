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
from garden.extract import ExtractionPlan, extract
from garden.series import LocalSeries


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
    tmp_path, compose_settings, small_corpus
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
    cfg = compose_settings(
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
