"""Per-unit statistics and the per-unit fork against known answers (numpy/scipy, diptest, BH by hand)."""

import diptest
import numpy as np
import pytest
import torch
from scipy import stats

from conftest import ArraySeries, unit_series
from garden.dip import dip_pvalues, dips_and_cuts
from garden.errors import GardenError
from garden.extract import ExtractionPlan, UnitLayout, extract
from garden.metrics import compute_metrics
from garden.metrics.units import bimodal_units
from garden.trajectory import Trajectory

# 30 checkpoints: Pythia-like log-spaced start, then evenly spaced.
STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, *range(300, 2300, 100)]


def extract_units(tensors: dict[int, torch.Tensor], folder, **plan_args) -> Trajectory:
    steps = tuple(sorted(tensors))
    series = ArraySeries({s: {"w": t} for s, t in tensors.items()})
    return extract(series, ExtractionPlan("w", steps, steps[0], **plan_args), folder, progress=False)


def skewed_columns(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Columns of clearly different shapes and offsets (|mean| >> std for some), in fp16 like Pythia."""
    rng = np.random.default_rng(seed)
    parts = [
        rng.normal(0.3, 0.02, (rows, cols // 4)),
        rng.exponential(0.02, (rows, cols // 4)) - 0.1,
        rng.lognormal(-4, 0.5, (rows, cols // 4)),
        np.where(rng.random((rows, cols - 3 * (cols // 4))) < 0.2, 0.05, -0.01)
        + rng.normal(0, 0.005, (rows, cols - 3 * (cols // 4))),
    ]
    return torch.from_numpy(np.concatenate(parts, axis=1)).half()


@pytest.mark.parametrize("axis", [1, 0])
def test_unit_moments_and_msd_match_numpy_and_scipy(tmp_path, axis):
    gen = torch.Generator().manual_seed(3)
    ref = skewed_columns(3000, 24)
    final = (ref.float() + 0.01 * torch.randn(3000, 24, generator=gen)).half()
    if axis == 0:
        ref, final = ref.t().contiguous(), final.t().contiguous()
    # A small chunk size makes several blocks, so the float64 accumulation across blocks is exercised.
    traj = extract_units({0: ref, 10: final}, tmp_path, unit_axis=axis, chunk_size=10_000)
    units = traj.units
    assert units.axis == axis and units.n_units == 24 and units.length == 3000
    x, x0 = final.double().numpy(), ref.double().numpy()
    reduce = 0 if axis == 1 else 1
    expected = {
        "mean": x.mean(reduce),
        "std": x.std(reduce),
        "msd": ((x - x0) ** 2).mean(reduce),
    }
    for name, want in expected.items():
        np.testing.assert_allclose(units.stats[name][-1], want, rtol=1e-6, err_msg=name)
    # Skewness and excess kurtosis are dimensionless with an O(1) natural scale: 1e-6 of max(1, |value|).
    for name, want in (
        ("skewness", stats.skew(x, axis=reduce)),
        ("kurtosis", stats.kurtosis(x, axis=reduce)),
    ):
        error = np.abs(units.stats[name][-1] - want) / np.maximum(1.0, np.abs(want))
        assert error.max() < 1e-6, name
    bc = units.bimodality_coefficient[-1]
    g, k, n = stats.skew(x, axis=reduce), stats.kurtosis(x, axis=reduce), x.shape[reduce]
    np.testing.assert_allclose(bc, (g**2 + 1) / (k + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))), rtol=1e-6)
    # Each unit's two groups at the final step: at or below its cut, and above, over the whole slice.
    split = units.final_split
    values = x if axis == 1 else x.T
    below = values <= split["cut"].to_numpy()[None, :]
    np.testing.assert_array_equal(split["low_count"], below.sum(0))
    np.testing.assert_allclose(split["low_mean"], (values * below).sum(0) / below.sum(0), rtol=1e-9)
    np.testing.assert_allclose(split["high_mean"], (values * ~below).sum(0) / (~below).sum(0), rtol=1e-9)
    # The pooled moments, combined from the units', are the whole tensor's.
    flat = x.ravel()
    assert traj.column("mean")[-1] == pytest.approx(flat.mean(), rel=1e-7)
    assert traj.column("std")[-1] == pytest.approx(flat.std(), rel=1e-6)
    assert traj.column("skewness")[-1] == pytest.approx(stats.skew(flat), rel=1e-6)
    assert traj.column("kurtosis")[-1] == pytest.approx(stats.kurtosis(flat), rel=1e-6)
    assert traj.column("msd")[-1] == pytest.approx(((x - x0) ** 2).mean(), rel=1e-6)


def test_unit_dips_equal_the_diptest_package_on_the_seeded_sample(tmp_path):
    tensors = unit_series([0, 5, 10], units=20, length=6000, forking_units=5, fork_step=5)
    traj = extract_units(tensors, tmp_path, unit_sample=1500)
    layout = UnitLayout((6000, 20), axis=1, unit_sample=1500, seed=0)
    assert traj.units.sample_size == 1500 and len(layout.positions) == 1500
    for index, step in enumerate([0, 5, 10]):
        sample = tensors[step].double().numpy()[layout.positions]
        expected = np.array([diptest.diptest(sample[:, u]) for u in range(20)])
        np.testing.assert_array_equal(traj.units.stats["dip"][index], expected[:, 0])
        np.testing.assert_array_equal(traj.units.stats["dip_pvalue"][index], expected[:, 1])


def test_dip_kernel_equals_diptest_on_awkward_samples():
    rng = np.random.default_rng(7)
    samples = [
        rng.normal(size=4),
        np.full(50, 0.25),  # all tied
        np.round(rng.normal(size=300), 1),  # many ties
        rng.normal(size=999).astype(np.float16),  # fp16 values
        np.concatenate([rng.normal(-2, 1, 400), rng.normal(2, 1, 600)]),
        -np.abs(rng.normal(size=257)),  # negatives and -0.0 handling in the radix sort
        np.array([0.0, -0.0, 1.0, -1.0, 3.0, 2.5]),
    ]
    for values in samples:
        values = np.asarray(values, dtype=np.float32)
        dip, cut = dips_and_cuts(values[None, :], kernel=True)
        want = diptest.diptest(values.astype(np.float64))
        assert dip[0] == want[0]
        assert dip_pvalues(values.size, dip)[0] == want[1]
        assert values.min() <= cut[0] <= values.max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_kernel_and_the_diptest_route_agree(dtype):
    """Large batches go to the compiled kernel, small ones to `diptest`: the same dips and cuts."""
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(40, 1000, generator=gen) * 0.02
    rows[:10, :150] += 0.1  # some bimodal rows
    rows = rows.to(dtype)
    by_kernel = dips_and_cuts(rows, kernel=True, threads=2)
    by_diptest = dips_and_cuts(rows, kernel=False)
    np.testing.assert_array_equal(by_kernel[0], by_diptest[0])
    np.testing.assert_array_equal(by_kernel[1], by_diptest[1])
    assert (by_kernel[0][:10] > by_kernel[0][10:].max()).all()


def test_benjamini_hochberg_by_hand():
    pvalues = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    # By hand (REFERENCE.md): the largest k with p_(k) <= k q / m; q = 0.05, m = 10 -> k = 2.
    assert list(bimodal_units(pvalues, 0.05)[0]) == [True, True] + [False] * 8
    # Step-up, not step-down: at q = 0.1 the 3rd and 4th fail their own bound (0.039 > 0.03,
    # 0.041 > 0.04) but the 6th passes (0.06 <= 0.06), so units 1..6 are called.
    assert list(bimodal_units(pvalues, 0.1)[0]) == [True] * 6 + [False] * 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_diffusion_has_no_unit_fork(tmp_path, seed):
    traj = extract_units(unit_series(STEPS, seed=seed), tmp_path)
    result = compute_metrics(traj, ["unit_bimodality"])["unit_bimodality"]
    assert result.tags["garden.unit_bifurcation"] == "none"
    assert "unit_bifurcation_step" not in result.summary
    assert result.per_step["bimodal_unit_fraction"].max() < 0.1


def test_a_quarter_of_the_units_forking_is_found_where_the_pooled_view_is_silent(tmp_path):
    traj = extract_units(unit_series(STEPS, forking_units=16, fork_step=700), tmp_path)
    results = compute_metrics(traj, ["bifurcation", "unit_bimodality"])
    units = results["unit_bimodality"]
    assert units.tags["garden.unit_bifurcation"] == "detected"
    assert units.summary["unit_bifurcation_step"] in (700, 800)
    assert units.summary["final_bimodal_unit_fraction"] == pytest.approx(0.25, abs=0.02)
    assert results["bifurcation"].tags["garden.bifurcation"] == "none"
    table = units.tables["units"]
    forked = table["first_bimodal_step"].iloc[:16]
    assert forked.notna().all() and set(forked) <= {700, 800}
    assert table["first_bimodal_step"].iloc[16:].isna().mean() > 0.9
    # Each forking unit's minor group holds about 12% of its entries, 6 spreads from the main one.
    minor = table[["group_low_size", "group_high_size"]].iloc[:16].min(axis=1) / 2048
    np.testing.assert_allclose(minor, 0.12, atol=0.03)


def test_every_entry_forking_is_found_by_both_views(tmp_path):
    traj = extract_units(unit_series(STEPS, forking_units=64, fork_step=700, every_entry=True), tmp_path)
    results = compute_metrics(traj, ["bifurcation", "unit_bimodality"])
    assert results["bifurcation"].summary["bifurcation_step"] == 700
    assert results["unit_bimodality"].summary["unit_bifurcation_step"] == 700
    assert results["unit_bimodality"].summary["final_bimodal_unit_fraction"] == 1.0


def test_featured_unit_is_the_most_bimodal_and_its_values_are_recorded(tmp_path):
    tensors = unit_series([0, 100, 200], units=12, length=3000, forking_units=3, fork_step=100, gap=8.0)
    traj = extract_units(tensors, tmp_path, n_trajectories=50)
    units = traj.units
    assert units.featured == int(np.argmax(units.stats["dip"][-1])) and units.featured < 3
    column = tensors[200][:, units.featured].numpy()
    np.testing.assert_array_equal(units.featured_values[-1], column[units.featured_positions])
    assert units.featured_hist[-1].sum() == 3000 and units.featured_values.shape == (3, 50)


def test_units_are_off_for_one_dimensional_tensors_and_when_asked(tmp_path):
    bias = {s: torch.randn(500) for s in (0, 1, 2)}
    traj = extract_units(bias, tmp_path / "bias")
    assert traj.units is None
    result = compute_metrics(traj, ["unit_bimodality"])["unit_bimodality"]
    assert result.tags["garden.unit_bifurcation"] == "off" and "1-D" in result.tags["garden.units"]
    off = extract_units(unit_series([0, 1]), tmp_path / "off", unit_axis=None)
    assert off.units is None


@pytest.mark.parametrize(
    "plan_args, shape, message",
    [
        ({"unit_axis": 1}, (100,), r"needs a 2-D tensor.*valid for this tensor: auto, null"),
        ({"unit_axis": 0}, (100, 3), r"too few for a dip test"),
    ],
)
def test_a_unit_axis_the_tensor_cannot_have_fails_before_reading(plan_args, shape, message):
    with pytest.raises(GardenError, match=message):
        ExtractionPlan("w", (0, 1), 0, **plan_args).resolve_unit_axis(shape)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["extract.unit_axis=2"], r"extract.unit_axis=2 is not valid; valid: auto, 0, 1, null"),
        (["extract.unit_sample=3"], r"extract.unit_sample=3 is not valid; valid: an integer >= 4"),
        (
            ["extract.unit_axis=1", "extract.subsample=50"],
            r"set extract.subsample=null or extract.unit_axis=null",
        ),
    ],
)
def test_bad_unit_settings_are_refused_by_the_schema(compose_settings, overrides, message):
    with pytest.raises(GardenError, match=message):
        compose_settings(*overrides)


def test_trajectory_with_units_survives_save_and_load(tmp_path):
    traj = extract_units(unit_series([0, 1, 2, 4], units=8, length=500), tmp_path / "cache")
    traj.save(tmp_path / "t.npz")
    back = Trajectory.load(tmp_path / "t.npz")
    for name, values in traj.units.stats.items():
        np.testing.assert_array_equal(back.units.stats[name], values)
    assert back.units.featured == traj.units.featured and back.units.axis == 1
    np.testing.assert_array_equal(back.units.final_split, traj.units.final_split)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_pass_on_cuda_gives_the_cpu_numbers(tmp_path):
    tensors = {s: t.half() for s, t in unit_series([0, 10, 20], units=96, length=3000, forking_units=20,
                                                    fork_step=10).items()}  # fmt: skip
    series = ArraySeries({s: {"w": t} for s, t in tensors.items()})
    plan = ExtractionPlan("w", (0, 10, 20), 0)
    cpu = extract(series, plan, tmp_path / "cpu", progress=False, device="cpu")
    gpu = extract(series, plan, tmp_path / "gpu", progress=False, device="cuda")
    for column in ("mean", "std", "skewness", "kurtosis", "msd", "step_msd", "min", "max"):
        np.testing.assert_allclose(
            gpu.column(column), cpu.column(column), rtol=1e-6, atol=1e-9, err_msg=column
        )
    # Bin edges may round differently on the GPU: only values on a boundary can change bins.
    assert np.abs(gpu.hist - cpu.hist).sum() <= 1e-4 * cpu.hist.sum()
    for name in ("mean", "std", "msd"):
        np.testing.assert_allclose(gpu.units.stats[name], cpu.units.stats[name], rtol=1e-6, err_msg=name)
    for name in ("skewness", "kurtosis"):
        np.testing.assert_allclose(gpu.units.stats[name], cpu.units.stats[name], atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(gpu.units.stats["dip"], cpu.units.stats["dip"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["layer.tensor=gpt_neox.layers.0.attention.dense.bias", "extract.unit_axis=1"],
            r"dense.bias has shape \[128\]; valid for this tensor: auto, null",
        ),
        (["metrics.unit_fdr=1.5"], r"metrics.unit_fdr=1.5 is not valid; valid: a number in \(0, 1\)"),
        (["metrics.unit_fraction_threshold=0"], r"unit_fraction_threshold=0 is not valid; valid: .*\(0, 1\]"),
        (["extract.unit_axis=one"], r"extract.unit_axis='one' is not valid; valid: auto, 0, 1, null"),
        (["extract.unit_axis=2"], r"extract.unit_axis=2 is not valid; valid: auto, 0, 1, null"),
    ],
)
def test_bad_unit_settings_fail_before_training_or_reading(compose_settings, tmp_path, overrides, message):
    from garden.tasks.dynamics import plan_dynamics

    with pytest.raises(GardenError, match=message):
        plan_dynamics(compose_settings(f"paths.data_dir={tmp_path / 'data'}", *overrides))
    assert not (tmp_path / "data" / "series").exists()  # the tiny series' shapes come from its config


def test_an_explicit_axis_is_checked_against_a_local_series_header(compose_settings, tmp_path):
    from conftest import write_series
    from garden.tasks.dynamics import plan_dynamics

    root = write_series(tmp_path / "s", {s: {"embed_out.weight": torch.zeros(100, 3)} for s in (0, 1)})
    cfg = compose_settings("model=local", f"model.path={root}", "extract.unit_axis=0")
    with pytest.raises(GardenError, match=r"units of embed_out.weight \[100, 3\] have 3 entries"):
        plan_dynamics(cfg)


@pytest.mark.parametrize("forking_units", [16, 0])
def test_the_featured_unit_is_coloured_by_group_only_where_it_forks(tmp_path, forking_units):
    """unit_trajectories: two groups, interleaved (neither colour drawn wholly over the other), where the
    featured unit forks; one grey bundle saying so where no unit forks (pure diffusion)."""
    import matplotlib.pyplot as plt

    from garden.figures import unit_trajectories

    traj = extract_units(unit_series(STEPS, forking_units=forking_units, fork_step=700), tmp_path)
    table = compute_metrics(traj, ["unit_bimodality"])["unit_bimodality"].tables["units"]
    figure = unit_trajectories(traj, table, "t")
    axis = figure.axes[0]
    colours = [line.get_color() for line in axis.get_lines() if line.get_linestyle() == "-"]
    labels = [text.get_text() for text in axis.get_legend().get_texts()]
    plt.close(figure)
    if forking_units:
        assert set(colours) == {"tab:blue", "tab:orange"}
        last_lower = len(colours) - 1 - colours[::-1].index("tab:blue")
        assert colours.index("tab:orange") < last_lower
    else:
        assert set(colours) == {"tab:gray"} and labels[0].startswith("no fork of this unit: one bundle")
