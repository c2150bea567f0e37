"""Paper 003: the synthetic task, the model, the two phases, determinism, bad settings (its preset's
run is in test_presets.py)."""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pandas as pd
import pytest
import torch

from garden import cooccurrence as co
from garden.errors import GardenError
from garden.settings import CooccurrenceSettings, read_section


def settings(**overrides) -> CooccurrenceSettings:
    """Paper 003's settings at their defaults (garden.settings.schema), some changed."""
    return read_section(CooccurrenceSettings, overrides, "cooccurrence.")


def test_class_proportions_are_exact_and_words_sit_where_they_should():
    data = co.make_dataset(60, 5, 64, seed=3)
    assert data.tokens.shape == (60, 5)
    counts = pd.Series(data.classes).value_counts().to_dict()
    assert counts == {"both": 30, "only_1": 10, "only_2": 10, "neither": 10}
    tokens = data.tokens.numpy()
    assert ((tokens == 2).sum(axis=1) == 1).all()  # mu_3 once in every sequence
    has1, has2 = (tokens == 0).any(axis=1), (tokens == 1).any(axis=1)
    expected = {
        "both": (True, True),
        "only_1": (True, False),
        "only_2": (False, True),
        "neither": (False, False),
    }
    for cls, (one, two) in expected.items():
        rows = data.classes == cls
        assert (has1[rows] == one).all() and (has2[rows] == two).all(), cls
    # Every other position holds one of mu_4..mu_d: only the planted words are below index 3.
    assert ((tokens <= 2).sum(axis=1) == 1 + has1 + has2).all() and tokens.max() < 64
    assert (data.labels.numpy() == np.where(data.classes == "both", 1, -1)).all()
    with pytest.raises(GardenError, match=r"cooccurrence.n=61 is not valid; valid: a positive multiple of 6"):
        settings(n=61)


def test_model_shapes_and_readout():
    model = co.CooccurrenceModel(d=64, m=128, m1=256, seed=0)
    assert model.W_Q.shape == model.W_K.shape == model.W_V.shape == (128, 64) and model.W.shape == (256, 128)
    assert set(model.a.tolist()) == {-1.0, 1.0}
    data = co.make_dataset(12, 5, 64, seed=0)
    assert model(data.tokens).shape == (12,)
    # F of a sequence of identical tokens is L * G(mu) (attention averages identical values).
    same = torch.full((1, 5), 4)
    assert float(model(same).detach()) == pytest.approx(5 * model.readout_value(5), rel=1e-10)


def test_phase_one_ends_before_the_attention_moves(tmp_path):
    record = co.train(settings(epochs=2000, log_points=120), tmp_path / "series", progress=False)
    summary = record.summary
    assert summary["final_accuracy"] == 1.0
    assert summary["phase1_end_epoch"] < summary["attention_move_epoch"]
    end = record.table.set_index("epoch").loc[summary["phase1_end_epoch"]]
    assert end["G_mu1"] > 0 and end["G_mu2"] > 0 > end["G_mu3"]
    first, last = record.table.iloc[0], record.table.iloc[-1]
    assert (
        last["score_12"] > first["score_12"] and last["score_21"] > first["score_21"]
    )  # phase 2 grows these
    assert last["score_31"] < first["score_31"] and last["score_32"] < first["score_32"]  # and shrinks these
    snapshots = sorted(int(p.name[4:]) for p in (tmp_path / "series").glob("step*"))
    assert snapshots == co.snapshot_steps(2000, 500)
    again = co.train(settings(epochs=2000, log_points=120), tmp_path / "series", progress=False)
    assert again.summary == summary and len(again.table) == len(record.table)  # read back, not retrained


def test_one_seed_gives_identical_numbers(tmp_path):
    a = co.train(settings(epochs=200, log_points=40), tmp_path / "a", progress=False)
    b = co.train(settings(epochs=200, log_points=40), tmp_path / "b", progress=False)
    pd.testing.assert_frame_equal(a.table, b.table)
    c = co.train(settings(epochs=200, log_points=40, seed=1), tmp_path / "c", progress=False)
    assert not np.allclose(a.table["loss"], c.table["loss"])


def test_descent_runs_on_one_thread_and_gives_back_the_callers_count(tmp_path, monkeypatch):
    """One intra-op thread (robust beside other jobs) changes no number; the caller's count is restored."""
    seen: list[int] = []
    descend = co._descend

    def spying(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return descend(*args, **kwargs)

    monkeypatch.setattr(co, "_descend", spying)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one = co.train(settings(epochs=200, log_points=40), tmp_path / "one", progress=False)
        assert seen == [1] and torch.get_num_threads() == 2
        monkeypatch.setattr(co, "_one_intra_op_thread", contextlib.nullcontext)
        two = co.train(settings(epochs=200, log_points=40), tmp_path / "two", progress=False)
        assert seen == [1, 2]
    finally:
        torch.set_num_threads(before)
    pd.testing.assert_frame_equal(one.table, two.table, rtol=1e-12)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["experiment=cooccurrence", "cooccurrence.n=50"], "multiple of 6"),
        (["experiment=cooccurrence", "cooccurrence.analyse_tensor=W_O"], "valid: one of W_Q, W_K, W_V, W"),
        (["experiment=cooccurrence", "metrics.names=[msd,entropy]"], "unknown metric(s): entropy"),
        (["task=sweep"], "valid: one of dynamics, cooccurrence"),
    ],
)
def test_bad_cooccurrence_settings_fail_before_training(tmp_path, compose_config, overrides, message):
    from garden.errors import GardenError
    from garden.tasks import run

    cfg = compose_config(*overrides, f"paths.data_dir={tmp_path}/data",
                         f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "progress=false")  # fmt: skip
    with pytest.raises(GardenError, match=re.escape(message)):
        run(cfg, output_dir=tmp_path / "out")
    assert not (tmp_path / "data" / "series").exists()  # nothing was trained
    assert not (tmp_path / "mlflow.db").exists()
