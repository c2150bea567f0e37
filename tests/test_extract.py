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
    "override, message",
    [
        ("extract.subsample=1", r"extract.subsample=1 is not valid; valid: an integer >= 2 or null"),
        ("extract.quantile_bins=1000", r"quantile_bins=1000 is not valid; valid: a multiple of extract.hist"),
        (
            "extract.quantiles=[0.5,1.5]",
            r"quantiles=\[0.5, 1.5\] is not valid; valid: a list of numbers in \(0, 1\)",
        ),
        ("extract.n_trajectories=-1", r"n_trajectories=-1 is not valid; valid: an integer >= 0"),
    ],
)
def test_bad_extraction_settings(compose_settings, override, message):
    with pytest.raises(GardenError, match=message):
        compose_settings(override)


# ------------------------------------------------------------------- bad values inside a checkpoint


def _series_with(bad: str, steps=(0, 1, 2, 4, 8, 16)) -> dict[int, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tensors = {s: {"embed_out.weight": torch.randn(40, 30, generator=gen) * (1 + s / 16)} for s in steps}
    weights = tensors[4]["embed_out.weight"]
    if bad == "nan":
        weights[3, 7] = float("nan")
    elif bad == "transposed":  # same number of values, another shape
        tensors[4]["embed_out.weight"] = weights.T.contiguous()
    return tensors


@pytest.mark.parametrize(
    "bad, message",
    [
        ("nan", r"step 4: embed_out.weight holds non-finite values"),
        ("transposed", r"step 4: .* has shape \[30, 40\]"),
    ],
)
def test_a_bad_step_fails_naming_it_or_is_excluded_and_recorded(tmp_path, compose_config, bad, message):
    """Issue 11's probes: one NaN, or a transposed tensor, at one step. By default the job fails naming
    the step before any metric; with series.on_bad_step=exclude the step is dropped, with a warning, and
    the run records it. No metric silently loses the step."""
    from mlflow.tracking import MlflowClient

    from conftest import write_series
    from garden.tasks import run

    root = write_series(tmp_path / f"series-{bad}", _series_with(bad))
    common = ["model=local", f"model.path={root}", "metrics=minimal", f"paths.data_dir={tmp_path}/data",
              f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "progress=false"]  # fmt: skip
    with pytest.raises(GardenError, match=message + r".*series.on_bad_step=exclude"):
        run(compose_config(*common), output_dir=tmp_path / "failed")
    outcome = run(compose_config(*common, "series.on_bad_step=exclude"), output_dir=tmp_path / "kept")
    assert list(outcome.trajectory.steps) == [0, 1, 2, 8, 16]
    assert outcome.summary["n_excluded_steps"] == 1
    assert outcome.tags["garden.excluded_steps"].startswith("step4: ")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    statuses = {r.info.run_id: r.info.status for r in client.search_runs(["0", "1"])}
    assert statuses[outcome.run_id] == "FINISHED" and sorted(statuses.values()) == ["FAILED", "FINISHED"]
    msd = [m.step for m in client.get_metric_history(outcome.run_id, "diffusion/msd")]
    assert msd == [0, 1, 2, 8, 16]
    steps_table = pd.read_csv(tmp_path / "kept" / "tables" / "steps.csv")
    assert np.isfinite(steps_table[["min", "max", "mean", "std"]].to_numpy()).all()


def test_a_bad_reference_or_final_step_cannot_be_excluded(tmp_path):
    tensors = _series_with("none")
    tensors[16]["embed_out.weight"][0, 0] = float("inf")
    plan = ExtractionPlan(tensor="embed_out.weight", steps=(0, 1, 2, 4, 8, 16), reference_step=0,
                          on_bad_step="exclude")  # fmt: skip
    with pytest.raises(GardenError, match=r"step 16: .* non-finite values .* at the final step"):
        extract(ArraySeries(tensors), plan, tmp_path, progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_compiled_cpu_sums_agree_with_torchs_ops(dtype):
    """The pooled pass sums on the CPU in one compiled loop (garden.extract.fused) and elsewhere with
    torch's ops (`_torch_sums`, what a GPU runs): the same numbers, the compiled ones float64 throughout."""
    from garden.extract.kernel import Workspace, _cpu_sums, _torch_sums, pass_blocks

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(300_001, generator=gen) * 0.02 + 0.5).to(dtype)  # |mean| >> std: the shift's case
    ref = (x.float() + torch.randn(x.shape, generator=gen) * 1e-3).to(dtype)
    prev = (x.float() + torch.randn(x.shape, generator=gen) * 1e-4).to(dtype)
    blocks, width = pass_blocks(tuple(x.shape), 65536, None)
    space = Workspace(width, 1024)
    try:
        compiled, shift = _cpu_sums(x, ref, prev, blocks, space, dtype)
        by_torch, torch_shift = _torch_sums(x, ref, prev, blocks, space, dtype)
    finally:
        space.close()
    assert shift == torch_shift
    exact = x.double() - shift
    expected = [float((exact**k).sum()) for k in (1, 2, 3, 4)]
    expected += [
        float(((x.double() - ref.double()) ** 2).sum()),
        float(((x.double() - prev.double()) ** 2).sum()),
    ]
    assert compiled == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert by_torch == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_the_compiled_cpu_sums_carry_a_nan_to_the_steps_check():
    from garden.extract.kernel import Workspace, _cpu_sums, pass_blocks

    x = torch.randn(1000)
    x[17] = float("nan")
    blocks, width = pass_blocks(tuple(x.shape), 256, None)
    space = Workspace(width, 64)
    try:
        sums, _ = _cpu_sums(x, x, None, blocks, space, x.dtype)
    finally:
        space.close()
    assert all(s != s for s in sums[:5]) and sums[5] == 0.0
