"""The streaming extraction: resume, cache validity, subsampling, memory shape."""

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ArraySeries, random_walk
from garden.errors import GardenError
from garden.extract import ExtractionPlan, extract

STEPS = [0, 1, 2, 4, 8, 16, 32, 64]


def plan_for(steps=STEPS, **kwargs):
    return ExtractionPlan(tensor="w", steps=tuple(steps), reference_step=steps[0], **kwargs)


def walk_series(**kwargs):
    return ArraySeries({s: {"w": t.half()} for s, t in random_walk(STEPS, (300, 70), 1e-6).items()}, **kwargs)


def test_resume_after_interruption_gives_identical_results(tmp_path):
    clean = extract(walk_series(), plan_for(), tmp_path / "clean", progress=False)

    interrupted = walk_series(fail_at=16)
    with pytest.raises(KeyboardInterrupt):
        extract(interrupted, plan_for(), tmp_path / "resumed", progress=False)
    finished = sorted(p.name for p in (tmp_path / "resumed").rglob("step*.npz"))
    assert finished == sorted(f"step{s}.npz" for s in STEPS[:5])

    resumed_series = walk_series()
    resumed_series.identity = interrupted.identity  # the same series, a new process
    resumed = extract(resumed_series, plan_for(), tmp_path / "resumed", progress=False)
    # Only the reference, the last finished step (for the displacement) and the rest are read again.
    assert sorted(set(resumed_series.reads)) == [0, 8, 16, 32, 64]
    resumed.table["step"] = resumed.table["step"].astype(int)
    pd.testing.assert_frame_equal(resumed.table, clean.table, check_dtype=False)
    np.testing.assert_array_equal(resumed.hist, clean.hist)
    np.testing.assert_array_equal(resumed.trajectories, clean.trajectories)

    again = walk_series()
    again.identity = interrupted.identity
    extract(again, plan_for(), tmp_path / "resumed", progress=False)
    assert again.reads == []  # a finished extraction recomputes nothing


def test_a_different_selection_recomputes_only_displacements_that_changed(tmp_path):
    series = walk_series()
    extract(series, plan_for(), tmp_path, progress=False)
    series.reads.clear()
    thinned = extract(series, plan_for([0, 2, 8, 32, 64]), tmp_path, progress=False)
    # Steps whose previous selected step changed (2, 8, 32) are recomputed; 64 follows 32 in both
    # selections, so its record is reused.
    assert {2, 8, 32} <= set(series.reads) and 64 not in series.reads
    assert list(thinned.steps) == [0, 2, 8, 32, 64]
    assert thinned.column("displacement")[1] == pytest.approx(thinned.column("step_msd")[1] / 2)


def test_changed_weights_invalidate_the_cache(tmp_path):
    series = walk_series()
    first = extract(series, plan_for(), tmp_path, progress=False)
    series.tensors[64]["w"] = series.tensors[64]["w"] * 2
    second = extract(series, plan_for(), tmp_path, progress=False)
    assert second.column("mean")[-1] == pytest.approx(2 * first.column("mean")[-1], rel=1e-3)


def test_subsample_is_seeded_and_sized(tmp_path):
    series = walk_series()
    a = extract(series, plan_for(subsample=5000, n_trajectories=10), tmp_path / "a", progress=False)
    b = extract(walk_series(), plan_for(subsample=5000, n_trajectories=10), tmp_path / "b", progress=False)
    assert a.n == 5000 and a.trajectories.shape == (len(STEPS), 10)
    np.testing.assert_array_equal(a.table["msd"], b.table["msd"])


def test_tensor_of_changing_size_is_an_error(tmp_path):
    series = walk_series()
    series.tensors[8]["w"] = torch.zeros(10)
    with pytest.raises(
        GardenError, match=r"step 8: w has shape \[10\], the reference step 0 has \[300, 70\]"
    ):
        extract(series, plan_for(), tmp_path, progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"subsample": 1}, "subsample"),
        ({"quantile_bins": 1000}, "multiple"),
        ({"quantiles": (1.5,)}, r"\[0, 1\]"),
    ],
)
def test_bad_extraction_settings(kwargs, message):
    with pytest.raises(GardenError, match=message):
        plan_for(**kwargs).validate()
