"""`python -m garden.compare`: runs read back from MLflow, the power-law fit, what is logged where."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from garden.compare import compare, main, model_size, power_law_fit

# Pythia's shapes (layers, width); vocabulary 50304.
SHAPES = {"pythia-70m": (6, 512), "pythia-160m": (12, 768), "pythia-410m": (24, 1024)}


def architecture(layers: int, width: int) -> dict[str, str]:
    return {
        "model.architecture.num_hidden_layers": str(layers),
        "model.architecture.hidden_size": str(width),
        "model.architecture.vocab_size": "50304",
    }


def test_model_size_matches_pythia_names():
    sizes = {name: model_size(architecture(*shape)) for name, shape in SHAPES.items()}
    assert sizes["pythia-70m"] == pytest.approx(70.4e6, rel=0.01)
    assert sizes["pythia-160m"] == pytest.approx(162.2e6, rel=0.01)
    assert sizes["pythia-410m"] == pytest.approx(405.3e6, rel=0.01)
    assert model_size({"model.name": "local"}) is None


def test_power_law_fit_recovers_exponent_and_needs_two_sizes():
    sizes = np.array([1e6, 1e7, 1e8, 1e9])
    fit = power_law_fit(sizes, 3.0 * sizes**0.4)
    assert fit["powerlaw_exponent"] == pytest.approx(0.4)
    assert fit["powerlaw_prefactor"] == pytest.approx(3.0)
    assert fit["powerlaw_r2"] == pytest.approx(1.0)
    # Missing bifurcations (NaN) are left out; one size left defines no line.
    assert power_law_fit(np.array([1e6, 1e7]), np.array([50.0, np.nan])) is None
    assert power_law_fit(np.array([1e6, 1e6]), np.array([50.0, 60.0])) is None


def _logged_sweep(uri: str, with_parent: bool = True) -> tuple[str | None, list[str], dict[str, float]]:
    """A sweep as garden logs it: a parent, and a child per model whose bifurcation step is 0.02·size^0.5."""
    client = MlflowClient(uri)
    experiment = client.create_experiment("garden")
    parent = client.create_run(experiment, run_name="sweep/x", tags={"garden.sweep": "parent"})
    parent_id = parent.info.run_id if with_parent else None
    children, expected = [], {}
    for name, (layers, width) in SHAPES.items():
        tags = {"mlflow.parentRunId": parent_id} if parent_id else {}
        run = client.create_run(experiment, run_name=f"{name}/standard/unembedding", tags=tags)
        params = {"model.name": name, "variant": "standard", "layer.name": "unembedding",
                  **architecture(layers, width)}  # fmt: skip
        size = model_size(params)
        expected[name] = size
        steps = [0, 1, 2, 4, 8, 16]
        history = [Metric("diffusion/msd", 1e-4 * s * width, 0, s) for s in steps]
        history += [Metric("bimodality/bimodality_coefficient", 0.3 + 0.01 * s, 0, s) for s in steps]
        history += [Metric("eval/perplexity", 1000.0 / (1 + s), 0, s) for s in steps]
        history += [Metric("units/bimodal_unit_fraction", min(1.0, 0.05 * s), 0, s) for s in steps]
        client.log_batch(run.info.run_id, metrics=history, params=[Param(k, v) for k, v in params.items()])
        for key, value in {"bifurcation_step": 0.02 * size**0.5, "unit_bifurcation_step": 0.5 * size**0.3,
                           "final_bimodal_unit_fraction": 0.4, "stationary_step": 16.0, "alpha": 1.2,
                           "final_perplexity": 60.0}.items():  # fmt: skip
            client.log_metric(run.info.run_id, f"summary/{key}", value)
        client.set_terminated(run.info.run_id, "FINISHED")
        children.append(run.info.run_id)
    # A failed job stays in the table and out of the fit.
    failed = client.create_run(experiment, run_name="pythia-1b/standard/unembedding",
                               tags={"mlflow.parentRunId": parent_id} if parent_id else {})  # fmt: skip
    client.log_metric(failed.info.run_id, "bifurcation_step", 1.0)
    client.set_terminated(failed.info.run_id, "FAILED")
    children.append(failed.info.run_id)
    client.set_terminated(parent.info.run_id, "FINISHED")
    return parent_id, children, expected


def test_compare_latest_sweep_writes_table_figures_and_logs_to_parent(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent_id, children, expected = _logged_sweep(uri)
    folder = compare(uri, "garden", tmp_path / "out")
    table = pd.read_csv(folder / "comparison.csv")
    assert sorted(table["run_id"]) == sorted(children)
    finished = table[table["status"] == "FINISHED"].set_index("model")
    assert finished["model_size"].to_dict() == pytest.approx(expected)
    assert list(table.loc[table["status"] == "FAILED", "run_name"]) == ["pythia-1b/standard/unembedding"]
    assert finished["unit_bifurcation_step"].to_dict() == pytest.approx(
        {name: 0.5 * size**0.3 for name, size in expected.items()}
    )
    assert (finished["final_bimodal_unit_fraction"] == 0.4).all()
    assert sorted(p.name for p in (folder / "figures").glob("*.png")) == [
        "bifurcation_vs_size.png", "bimodal_unit_fraction_overlay.png", "bimodality_coefficient_overlay.png",
        "msd_overlay.png", "perplexity_overlay.png", "unit_bifurcation_vs_size.png",
    ]  # fmt: skip
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    assert parent.data.metrics["powerlaw_exponent"] == pytest.approx(0.5)
    assert parent.data.metrics["powerlaw_points"] == 3
    # The unit onset is fitted beside the pooled one.
    assert parent.data.metrics["unit_powerlaw_exponent"] == pytest.approx(0.3)
    assert parent.data.metrics["unit_powerlaw_prefactor"] == pytest.approx(0.5)
    logged = {a.path for a in client.list_artifacts(parent_id, "comparison")}
    assert {"comparison/comparison.csv", "comparison/figures", "comparison/fit.json"} <= logged


def test_compare_named_runs_without_parent_makes_a_compare_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _, children, _ = _logged_sweep(uri, with_parent=False)
    compare(uri, "garden", tmp_path / "out", run_ids=children[:2])
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("garden").experiment_id],
                                "attributes.run_name = 'compare'")  # fmt: skip
    assert run.info.status == "FINISHED"
    assert run.data.tags["garden.compare"] == ",".join(children[:2])
    assert run.data.metrics["powerlaw_exponent"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no sweep in experiment 'garden'"),
        (["--runs", "0123abcd"], "MLflow run '0123abcd' not found"),
        (["--sweep-dir", "nowhere"], "nowhere/mlflow_parent_run_id not found"),
        (["--dvc", "nowhere"], "no */run.json under nowhere"),
    ],
)
def test_compare_bad_selection_is_a_clear_error(tmp_path, monkeypatch, args, message):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("garden")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--tracking-uri", uri, *args])
    assert message in str(exit_info.value)
    assert not (tmp_path / "outputs").exists()


def test_runs_of_one_name_stay_apart_with_a_column_per_swept_key(tmp_path):
    """Two jobs of a sweep over a key their run name does not hold (as runs logged before the names
    carried the overrides): the table tells them apart by run id and a `seed` column, the overlay draws
    both, and no empty onset-vs-size frame is made for runs of one size."""
    from garden.compare import comparison_table, curve_labels, curves, draw

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("garden")
    for seed, onset in (("0", 40.0), ("1", -1.0)):  # -1: how older runs logged "looked for, not reached"
        run = client.create_run(experiment, run_name="tiny/standard/unembedding")
        params = {"model.name": "tiny", "variant": "standard", "layer.name": "unembedding", "seed": seed,
                  "hydra.overrides": f"seed={seed} metrics=minimal", "hydra.choices.metrics": "minimal",
                  "resolved.output_dir": f"outputs/{seed}", **architecture(4, 128)}  # fmt: skip
        history = [Metric("diffusion/msd", (1 + int(seed)) * 1e-4 * s, 0, s) for s in (0, 1, 2, 4, 8)]
        client.log_batch(run.info.run_id, metrics=history, params=[Param(k, v) for k, v in params.items()])
        client.log_metric(run.info.run_id, "summary/bifurcation_step", onset)
        client.set_terminated(run.info.run_id, "FINISHED")
    runs = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
    table = comparison_table(runs)
    assert table["run_id"].is_unique and list(table["seed"]) == ["0", "1"]
    assert "metrics" not in table and "resolved.output_dir" not in table  # the same in both / not a setting
    assert table["bifurcation_step"].iloc[0] == 40 and np.isnan(table["bifurcation_step"].iloc[1])
    histories = curves(client, runs)
    assert set(histories["diffusion/msd"]) == set(table["run_id"])
    labels = curve_labels(table)
    assert len(set(labels.values())) == 2
    figures = draw(table, histories, {}, "two seeds")
    assert sorted(figures) == ["msd_overlay.png"]
    line_steps = [line.get_xdata() for line in figures["msd_overlay.png"].axes[0].get_lines()]
    assert len(line_steps) == 2 and all(min(steps) > 0 for steps in line_steps)  # no step 0 on log axes
