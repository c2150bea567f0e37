"""The figures' data: the segmented MSD fit, the final-branch split, the exported tables, what each figure
draws (thresholds, markers, labels) and the formats it is written in."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from conftest import ArraySeries, planted_fork
from garden.extract import ExtractionPlan, extract
from garden.figures import (
    bimodality_vs_step,
    density_table,
    draw_all,
    draw_cooccurrence,
    forking_trajectories,
    msd_loglog,
    plt,
    trajectory_branches,
    two_group_cut,
)
from garden.metrics import compute_metrics
from garden.metrics.diffusion import segmented_power_law
from garden.settings import MetricSettings, read_section

STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256]
SETTINGS = read_section(MetricSettings, {"bifurcation_criterion": "dip"}, "metrics.")  # thresholds at default


def three_regimes(x: np.ndarray) -> np.ndarray:
    """A continuous MSD: t^2.5 up to 40, t^1 up to 400, then t^0.05."""
    return np.where(x < 40, x**2.5, np.where(x < 400, 40**2.5 * (x / 40), 40**2.5 * 10 * (x / 400) ** 0.05))


def test_segmented_power_law_finds_planted_regimes_and_their_breakpoints():
    x = np.unique(np.concatenate([2.0 ** np.arange(0, 7), np.arange(80, 1300, 20)]))
    noisy = three_regimes(x) * np.exp(np.random.default_rng(0).normal(0, 0.02, len(x)))
    fit = segmented_power_law(x, noisy, max_segments=3, min_points=4)
    slopes = [segment[2] for segment in fit["segments"]]
    starts = [x[segment[0]] for segment in fit["segments"]]
    assert slopes == pytest.approx([2.5, 1.0, 0.05], abs=0.08)
    assert starts == [1, 64, 400]  # the first checkpoint of each regime (32 ends the first)
    assert fit["r2"] > 0.999 and min(fit["bic"], key=fit["bic"].get) == 3
    # One power law is chosen where there is one, however many segments are allowed.
    single = segmented_power_law(
        x, 3e-6 * x**1.3 * np.exp(np.random.default_rng(1).normal(0, 0.02, len(x))), 4, 4
    )
    assert len(single["segments"]) == 1 and single["segments"][0][2] == pytest.approx(1.3, abs=0.01)


def test_segmented_power_law_split_is_the_exhaustive_least_squares_optimum():
    """The DP against every split of the points into 1, 2 and 3 segments of >= 4 points, each segment
    fitted by np.polyfit: the same optimum (and so the same BIC) for each count, the same chosen split."""
    x = np.unique(np.concatenate([2.0 ** np.arange(0, 6), np.arange(40, 700, 30)]))
    y = three_regimes(x) * np.exp(np.random.default_rng(2).normal(0, 0.15, len(x)))
    lx, ly = np.log(x), np.log(y)
    n, least = len(x), 4

    def rss(i: int, j: int) -> float:
        coefficients = np.polyfit(lx[i:j], ly[i:j], 1)
        return float(((np.polyval(coefficients, lx[i:j]) - ly[i:j]) ** 2).sum())

    best = {}
    for k in (1, 2, 3):
        splits = [
            (0, *cuts, n)
            for cuts in itertools.combinations(range(least, n - least + 1), k - 1)
            if all(b - a >= least for a, b in itertools.pairwise((0, *cuts, n)))
        ]
        best[k] = min((sum(rss(a, b) for a, b in itertools.pairwise(split)), split) for split in splits)
    fit = segmented_power_law(x, y, max_segments=3, min_points=least)
    for k, (cost, _) in best.items():
        assert fit["bic"][k] == pytest.approx(n * np.log(cost / n) + (3 * k - 1) * np.log(n), rel=1e-9)
    chosen = len(fit["segments"])
    assert chosen == min(fit["bic"], key=fit["bic"].get)
    assert [i for i, *_ in fit["segments"]] + [n] == list(best[chosen][1])
    for i, j, slope, intercept in fit["segments"]:
        assert (slope, intercept) == pytest.approx(tuple(np.polyfit(lx[i:j], ly[i:j], 1)), rel=1e-9)


def test_two_group_cut_is_exact_two_means():
    values = np.array([-1.2, -1.0, -0.9, 0.8, 1.1, 1.4, 1.5])
    cut = two_group_cut(values)
    assert -0.9 < cut < 0.8
    rng = np.random.default_rng(0)
    sample = rng.normal(0, 1, 41)
    # Brute force over every split of the sorted values.
    ordered = np.sort(sample)
    costs = [ordered[:k].var() * k + ordered[k:].var() * (41 - k) for k in range(1, 41)]
    k = int(np.argmin(costs)) + 1
    assert two_group_cut(sample) == pytest.approx((ordered[k - 1] + ordered[k]) / 2)


@pytest.fixture(scope="module")
def fork(tmp_path_factory):
    """A planted fork at step 32 as extracted by garden, with every metric the figures read."""
    tensors = {
        step: values.reshape(400, 50) for step, values in planted_fork(STEPS, onset=32, n=20000).items()
    }
    series = ArraySeries({step: {"w": t} for step, t in tensors.items()})
    plan = ExtractionPlan("w", STEPS, 0, n_trajectories=64, n_distribution_sample=4000, unit_axis=None)
    trajectory = extract(series, plan, tmp_path_factory.mktemp("fork"), progress=False)
    names = ["msd", "displacement", "alpha", "msd_regimes", "bimodality_coefficient", "dip", "gmm",
             "bifurcation", "stationary"]  # fmt: skip
    return trajectory, tensors, compute_metrics(trajectory, names, SETTINGS)


def test_trajectories_are_split_by_the_branch_they_end_in(fork):
    trajectory, tensors, _ = fork
    branches = trajectory_branches(trajectory)
    final = tensors[STEPS[-1]].reshape(-1).numpy()[trajectory.trajectory_indices]
    assert branches["final_value"].to_numpy() == pytest.approx(final)
    # The planted branches are +/- 0.3·(1 + log1p(t - onset)) around 0: the split is their sign.
    assert (branches["branch"] == np.where(final > 0, "upper", "lower")).all()
    figure = forking_trajectories(trajectory, "t", 32.0)
    lines = figure.axes[0].get_lines()
    colours = {line.get_color() for line in lines if line.get_linestyle() == "-"}
    assert colours == {"tab:blue", "tab:orange"}
    plt.close(figure)


def test_density_table_is_the_heatmap_matrix(fork):
    trajectory, _, _ = fork
    table = density_table(trajectory)
    assert len(table) == len(STEPS) * (len(trajectory.hist_edges) - 1)
    assert table.groupby("step")["fraction"].sum().to_numpy() == pytest.approx(1.0)
    first = table[table["step"] == STEPS[-1]]
    hist = trajectory.hist[-1]
    assert first["fraction"].to_numpy() == pytest.approx(hist / hist.sum())


def test_msd_figure_draws_each_regime_and_the_local_slope(fork):
    trajectory, _, results = fork
    regimes = results["msd_regimes"]
    table = regimes.tables["msd_regimes"]
    assert regimes.summary["msd_regimes"] == len(table) >= 1
    figure = msd_loglog(trajectory, "t", results)
    top, bottom = figure.axes
    labels = [line.get_label() for line in top.get_lines()]
    assert sum(label.startswith("regime ") for label in labels) == len(table)
    assert any(label.startswith("one power law") for label in labels)
    assert top.get_xscale() == "log" and top.get_yscale() == "log"
    slope = next(line for line in bottom.get_lines() if line.get_label().startswith("local slope"))
    assert min(slope.get_xdata()) > 0  # no step 0 on the log axis
    plt.close(figure)


def test_bimodality_criteria_get_a_panel_each_with_its_own_threshold(fork):
    trajectory, _, results = fork
    onset = results["bifurcation"].summary["bifurcation_step"]
    figure = bimodality_vs_step(trajectory, "t", results, SETTINGS, onset, "dip")
    assert len(figure.axes) == 3
    thresholds = [
        [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"] for ax in figure.axes
    ]
    assert thresholds == [[pytest.approx(5 / 9)], [0.05], [2.0]]
    assert [ax.get_yscale() for ax in figure.axes] == ["linear", "log", "linear"]
    assert all(
        any(line.get_label().startswith("bifurcation = ") for line in ax.get_lines()) for ax in figure.axes
    )
    plt.close(figure)


def test_every_figure_is_written_as_png_and_svg(fork, tmp_path):
    trajectory, _, results = fork
    written = draw_all(trajectory, results, "t", SETTINGS, tmp_path)
    names = {path.stem for path in written}
    assert {"density", "forking_trajectories", "msd_loglog", "displacement", "bimodality"} <= names
    for stem in names:
        assert (tmp_path / f"{stem}.png").stat().st_size > 10_000
        svg = (tmp_path / f"{stem}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<dc:date>" not in svg
    # The density mesh is one embedded image in the SVG, not a path per cell.
    assert (tmp_path / "density.svg").stat().st_size < 2_000_000


def test_cooccurrence_figures_use_the_papers_notation_and_mark_both_phases(tmp_path, monkeypatch):
    from garden import figures
    from garden.cooccurrence import CLASSES, SCORE_PAIRS

    epochs = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128])
    table = pd.DataFrame({"epoch": epochs, "loss": 1 / (1 + epochs)})
    for i, j in SCORE_PAIRS:
        table[f"score_{i}{j}"] = 0.01 * epochs * (i - j)
    for name in CLASSES:
        table[f"loss_{name}"] = 1 / (2 + epochs)
    for k in (1, 2, 3):
        table[f"G_mu{k}"] = 0.1 * k * np.log1p(epochs)
    phases = {"phase1_end_epoch": 16.0, "attention_move_epoch": 4.0}
    draw_cooccurrence(table, phases, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"attention_scores.png", "attention_scores.svg",
                                                    "class_losses.svg", "readout.svg"}  # fmt: skip
    assert "score_12" not in (tmp_path / "attention_scores.svg").read_text()  # no column names in legends
    drawn: dict = {}
    monkeypatch.setattr(figures, "save_figures", lambda figs, folder: drawn.update(figs) or [])
    draw_cooccurrence(table, phases, tmp_path)
    ax = drawn["attention_scores.png"].axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert r"$\mu_1^\top W_K^\top W_Q\, \mu_2$" in labels
    assert "phase 1 ends (all correct): epoch 16" in labels and "attention starts to move: epoch 4" in labels
    assert ax.get_xlabel().startswith("epoch")
    for figure in drawn.values():
        plt.close(figure)


def test_a_tensor_that_does_not_fork_is_drawn_as_one_bundle(fork):
    """Where the pooled bifurcation is not reached, the trajectories are one colour and the exported
    branches say none: a two-means cut through a unimodal distribution draws branches the run rejects."""
    trajectory, _, _ = fork
    figure = forking_trajectories(trajectory, "t", None)
    lines = [line for line in figure.axes[0].get_lines() if line.get_linestyle() == "-"]
    assert {line.get_color() for line in lines} == {"tab:gray"}
    assert "does not fork" in figure.axes[0].get_title()
    plt.close(figure)
    assert set(trajectory_branches(trajectory, forked=False)["branch"]) == {"none"}


def test_forked_branches_are_drawn_interleaved(fork):
    """Neither colour is drawn wholly over the other: the paths go in index order, branches mixed."""
    trajectory, _, _ = fork
    figure = forking_trajectories(trajectory, "t", 32.0)
    colours = [line.get_color() for line in figure.axes[0].get_lines() if line.get_linestyle() == "-"]
    plt.close(figure)
    first_upper, last_lower = colours.index("tab:orange"), len(colours) - 1 - colours[::-1].index("tab:blue")
    assert first_upper < last_lower


def test_steps_whose_two_gaussian_fit_has_one_mean_are_marked_as_heavy_tails(fork):
    """Ashman's D falls to ~0 where the fit puts both components at one mean (a narrow and a wide one:
    heavy tails): those steps are marked and the legend says so; a real fork's steps are not."""
    import dataclasses

    from garden.figures import bimodality_vs_step

    trajectory, _, results = fork
    fits = dict(results["gmm"].per_step)
    before_fork = trajectory.steps < 32
    fits["gmm_mean_high"] = np.where(before_fork, fits["gmm_mean_low"], fits["gmm_mean_high"])
    results = {**results, "gmm": dataclasses.replace(results["gmm"], per_step=fits)}
    figure = bimodality_vs_step(trajectory, "t", results, SETTINGS, 32.0, "dip")
    marked = [line for line in figure.axes[-1].get_lines() if line.get_marker() == "x"]
    plt.close(figure)
    assert len(marked) == 1 and "heavy tails, not two modes" in marked[0].get_label()
    assert list(marked[0].get_xdata()) == list(trajectory.steps[before_fork])
