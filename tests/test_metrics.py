"""Metrics against known answers."""

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import ArraySeries, planted_fork, random_walk
from garden.errors import GardenError
from garden.extract import ExtractionPlan, extract, histogram_quantiles, step_statistics
from garden.metrics import available_metrics, compute_metrics, validate_metric_names
from garden.metrics.distribution import ashman_d, sarle_bimodality
from garden.metrics.events import onset_index

ALL = [
    "msd",
    "displacement",
    "lag_msd",
    "alpha",
    "moments",
    "bimodality_coefficient",
    "dip",
    "gmm",
    "bifurcation",
    "stationary",
]


def trajectory_of(tensors: dict[int, torch.Tensor], tmp_path, **plan_args):
    series = ArraySeries({s: {"w": t} for s, t in tensors.items()})
    steps = tuple(sorted(tensors))
    plan = ExtractionPlan(tensor="w", steps=steps, reference_step=steps[0], **plan_args)
    return extract(series, plan, tmp_path / "cache", progress=False)


def test_registry_holds_the_forking_paths_metrics():
    assert set(ALL) <= set(available_metrics())
    with pytest.raises(GardenError, match=r"valid: .*bimodality_coefficient"):
        validate_metric_names(["msd", "entropy"])


def test_step_statistics_match_numpy_and_scipy():
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(300_001, generator=gen) * 0.3 + 2.0).float()  # |mean| >> std: shift must hold
    ref = torch.randn(300_001, generator=gen).float()
    prev = x + 0.01 * torch.randn(300_001, generator=gen).float()
    got = step_statistics(x, ref, prev, -5.0, 5.0, 65536, chunk_size=65536)
    xs = x.double().numpy()
    assert got["mean"] == pytest.approx(xs.mean(), rel=1e-7)
    assert got["std"] == pytest.approx(xs.std(), rel=1e-6)
    assert got["skewness"] == pytest.approx(stats.skew(xs), abs=2e-5)
    assert got["kurtosis"] == pytest.approx(stats.kurtosis(xs), abs=2e-5)
    assert got["msd"] == pytest.approx(((xs - ref.double().numpy()) ** 2).mean(), rel=1e-6)
    assert got["step_msd"] == pytest.approx(((xs - prev.double().numpy()) ** 2).mean(), rel=1e-5)
    assert got["min"] == xs.min() and got["max"] == xs.max()
    counts = got["fine_hist"]
    assert counts.sum() == x.numel()
    qs = [0.01, 0.25, 0.5, 0.75, 0.99]
    approx = histogram_quantiles(counts, -5.0, 5.0, qs, got["min"], got["max"])
    bin_width = 10.0 / 65536
    np.testing.assert_allclose(approx, np.quantile(xs, qs), atol=bin_width)


def test_msd_of_a_random_walk_grows_at_its_known_rate(tmp_path):
    rate = 1e-6
    steps = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    traj = trajectory_of(random_walk(steps, (400, 250), rate), tmp_path)
    msd = traj.column("msd")
    np.testing.assert_allclose(msd[1:], rate * np.array(steps[1:]), rtol=0.05)
    disp = traj.column("displacement")
    np.testing.assert_allclose(disp[1:], rate, rtol=0.05)
    results = compute_metrics(traj, ["alpha", "displacement"])
    assert results["alpha"].summary["alpha"] == pytest.approx(1.0, abs=0.03)
    assert results["alpha"].summary["alpha_r2"] > 0.99


def test_lag_msd_of_a_random_walk_is_linear_in_the_lag(tmp_path):
    rate = 1e-6
    steps = [0, 1, 2, 4, *list(range(10, 310, 10))]
    traj = trajectory_of(random_walk(steps, (500, 200), rate, seed=3), tmp_path, n_distribution_sample=50_000)
    table = compute_metrics(traj, ["lag_msd"], {"lag_msd_max_lag": 5})["lag_msd"].tables["lag_msd"]
    assert list(table["lag_steps"]) == [10, 20, 30, 40, 50]
    np.testing.assert_allclose(table["tamsd"], rate * table["lag_steps"], rtol=0.05)


@pytest.mark.parametrize(
    "skew, kurt, expected",
    [(0.0, 0.0, 1 / 3), (0.0, -1.2, 5 / 9), (0.0, -2.0, 1.0), (2.0, 6.0, 5 / 9)],
    ids=["normal", "uniform", "two-point", "exponential"],
)
def test_sarle_coefficient_of_known_distributions(skew, kurt, expected):
    # For n -> infinity the finite-sample correction tends to 3.
    assert sarle_bimodality(skew, kurt, 10**9) == pytest.approx(expected, rel=1e-6)


def test_sarle_coefficient_on_samples(tmp_path):
    rng = np.random.default_rng(0)
    samples = {
        "normal": (rng.normal(size=200_000), 1 / 3),
        "uniform": (rng.uniform(-1, 1, size=200_000), 5 / 9),
        "bimodal": (np.concatenate([rng.normal(-3, 0.5, 100_000), rng.normal(3, 0.5, 100_000)]), None),
    }
    for name, (values, expected) in samples.items():
        bc = sarle_bimodality(stats.skew(values), stats.kurtosis(values), values.size)
        if expected is None:
            assert bc > 5 / 9, name
        else:
            assert bc == pytest.approx(expected, abs=0.01), name
    # The small-sample correction: n = 10 gives 3 * 81 / 56.
    assert sarle_bimodality(0.0, 0.0, 10) == pytest.approx(1 / (3 * 81 / 56))


def test_onset_requires_the_condition_through_the_end():
    assert onset_index([False, False, True, True]) == 2
    assert onset_index([True, False, True, True, True]) == 2  # flicker back resets the onset
    assert onset_index([True, True, False]) is None
    assert onset_index([True, True]) == 0
    assert onset_index([]) is None


@pytest.mark.parametrize("criterion", ["bimodality_coefficient", "dip", "ashman_d"])
def test_planted_fork_is_detected_at_its_step(tmp_path, criterion):
    steps = list(range(0, 21))
    traj = trajectory_of(planted_fork(steps, onset=12), tmp_path)
    results = compute_metrics(traj, ALL, {"bifurcation_criterion": criterion, "seed": 0})
    assert results["bifurcation"].tags["garden.bifurcation"] == "detected"
    assert results["bifurcation"].summary["bifurcation_step"] == 12


def test_pure_diffusion_does_not_fork(tmp_path):
    steps = [0, 1, 2, 4, 8, 16, 32, 64, 128]
    traj = trajectory_of(random_walk(steps, (20000,), 1e-5, seed=5), tmp_path)
    for criterion in ("bimodality_coefficient", "dip", "ashman_d"):
        results = compute_metrics(traj, ["bifurcation"], {"bifurcation_criterion": criterion})
        assert results["bifurcation"].tags["garden.bifurcation"] == "none", criterion
        assert "bifurcation_step" not in results["bifurcation"].summary


def test_stationary_step_is_where_the_motion_collapses(tmp_path):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(10_000, generator=gen)
    tensors = {}
    for step in range(0, 30):
        scale = 0.1 if step <= 19 else 0.001  # the rate collapses to 1e-4 of its peak after step 19
        w = w + scale * torch.randn(10_000, generator=gen) if step else w
        tensors[step] = w.clone()
    traj = trajectory_of(tensors, tmp_path)
    results = compute_metrics(traj, ["stationary"], {"stationary_threshold": 0.05})
    assert results["stationary"].summary["stationary_step"] == 20
    # A walk at a steady rate never settles.
    steady = trajectory_of(random_walk(list(range(30)), (10_000,), 1e-4), tmp_path / "b")
    assert "stationary_step" not in compute_metrics(steady, ["stationary"]).get("stationary").summary


def test_ashman_d_and_the_gmm_on_separated_components(tmp_path):
    assert ashman_d(-1.0, 1.0, 0.25, 0.25) == pytest.approx(np.sqrt(2) * 2 / np.sqrt(0.5))
    traj = trajectory_of(planted_fork(list(range(0, 16)), onset=5, n=4000), tmp_path)  # a small sample
    gmm = compute_metrics(traj, ["gmm"], {"seed": 0})["gmm"].per_step
    assert gmm["ashman_d"][-1] > 2 and gmm["ashman_d"][0] < 2
    assert gmm["gmm_minor_weight"][-1] == pytest.approx(0.5, abs=0.05)
