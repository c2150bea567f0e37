"""task=early_stop: the live monitor's stop rules against validation-loss early stopping, per seed."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from conftest import SHRUNK_TINY
from garden.tasks.early_stop import validation_loss_stop


def transformers_stop(losses: list[float], patience: int, threshold: float, tmp_path) -> int | None:
    """Where `transformers.EarlyStoppingCallback` stops the Trainer on these evaluation losses: the
    callback sees each evaluation before the Trainer updates its best metric, as in `Trainer`."""
    from transformers import EarlyStoppingCallback, TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(str(tmp_path), metric_for_best_model="eval_loss", greater_is_better=False,
                             report_to=[])  # fmt: skip
    state, control = TrainerState(), TrainerControl()
    callback = EarlyStoppingCallback(early_stopping_patience=patience, early_stopping_threshold=threshold)
    for index, loss in enumerate(losses):
        callback.on_evaluate(args, state, control, metrics={"eval_loss": loss})
        if state.best_metric is None or loss < state.best_metric:  # Trainer._determine_best_metric
            state.best_metric = loss
        if control.should_training_stop:
            return index
    return None


@pytest.mark.parametrize("patience, threshold", [(1, 0.0), (3, 0.0), (2, 0.01), (4, 0.05)])
def test_the_validation_loss_rule_stops_where_transformers_callback_does(patience, threshold, tmp_path):
    rng = np.random.default_rng(patience)
    for trial in range(20):
        # A falling loss with noise that sometimes turns back up: stops early, late or never.
        losses = list(
            3.0 * np.exp(-np.arange(30) / rng.uniform(3, 30)) + rng.normal(0, 0.03, 30) + trial * 0.0
        )
        expected = transformers_stop(losses, patience, threshold, tmp_path)
        found = validation_loss_stop(list(range(30)), losses, patience, threshold)
        assert found == expected, (trial, losses)


@pytest.mark.slow
def test_the_experiment_reports_each_seed_and_rule_and_a_monitor_rule_stops_where_replayed(
    tmp_path, small_corpus, compose_config
):
    from mlflow.tracking import MlflowClient

    from garden.tasks import run

    cfg = compose_config("experiment=early_stop", f"corpus.path={small_corpus}", *SHRUNK_TINY,
                         "model.train.steps=80", "early_stop.seeds=[0,1]", "early_stop.patience=1",
                         f"paths.data_dir={tmp_path}/data", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                         "progress=false")  # fmt: skip
    table = run(cfg, output_dir=tmp_path / "out")
    assert list(zip(table["seed"], table["rule"], strict=True)) == [
        (seed, rule) for seed in (0, 1) for rule in ("stationary", "unit_bifurcation", "validation_loss")
    ]
    stationary = table[(table["rule"] == "stationary") & (table["seed"] == 0)].iloc[0]
    assert (
        stationary["stopped"] and stationary["stop_step"] < 80 and stationary["verified"]
    )  # trained for real
    assert stationary["compute_saved"] == pytest.approx(1 - stationary["stop_step"] / 80)
    for seed in (0, 1):
        evaluation = pd.read_csv(tmp_path / "out" / f"seed{seed}" / "full" / "tables" / "evaluation.csv")
        later = evaluation[evaluation["step"] > 0]
        stop = validation_loss_stop(list(later["step"]), [math.log(p) for p in later["perplexity"]], 3, 0.0)
        row = table[(table["rule"] == "validation_loss") & (table["seed"] == seed)].iloc[0]
        assert row["stop_step"] == (80 if stop is None else stop)
        at_stop = evaluation.set_index("step").loc[row["stop_step"], "perplexity"]
        assert row["heldout_perplexity_at_stop"] == pytest.approx(at_stop)
    assert (tmp_path / "out" / "tables" / "early_stop.csv").is_file()
    assert (tmp_path / "out" / "figures" / "early_stop.png").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("garden").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "early_stop/tiny"]
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert children == {f"early_stop/seed{s}/{r}" for s in (0, 1)
                        for r in ("full", "stationary", "unit_bifurcation", "validation_loss")}  # fmt: skip
    assert all(r.info.status == "FINISHED" for r in runs)
    assert "summary/stationary_compute_saved" in parent.data.metrics


def test_early_stop_needs_the_tiny_series(compose_config, tmp_path):
    from garden.errors import GardenError
    from garden.tasks import run

    cfg = compose_config("experiment=early_stop", "model=local", f"model.path={tmp_path}",
                         f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")  # fmt: skip
    with pytest.raises(GardenError, match=r"model=.local. is not valid; valid: tiny \(task=early_stop"):
        run(cfg, output_dir=tmp_path / "out")
