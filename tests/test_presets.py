"""Every `experiment=` preset (conf/experiment/) run in-process on shrunk settings, then what each paper's
preset must record: paper 002's PER and CKA, paper 001's perplexity and LAMBADA beside the dynamics,
paper 003's two phases and the analysis of its snapshots."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from conftest import SHRUNK_TINY
from garden import cooccurrence as co
from garden.config import config_dir
from garden.tasks import run

pytestmark = pytest.mark.slow

PRESETS = sorted(path.stem for path in (config_dir() / "experiment").glob("*.yaml"))
EVALUATION = ["evaluation.seq_len=16", "evaluation.max_windows=32", "evaluation.lambada.limit=40",
              "evaluation.cka.n_sequences=32"]  # fmt: skip
# What shrinks each preset to seconds (a preset not listed here runs on the shrunk tiny series).
SHRINK = {"cooccurrence": ["cooccurrence.epochs=600"]}
EVAL_STEPS = [0, 1, 2, 4, 8, 24, 40]  # the eval subset of the shrunk tiny series' 0, 1, 2, 4, 8, 16, ..., 40


@pytest.fixture(scope="module")
def preset_runs(tmp_path_factory, small_corpus):
    """Each preset run once for the module (in one MLflow store): preset -> its runs by name."""
    root = tmp_path_factory.mktemp("presets")
    done: dict[str, dict] = {}

    def run_preset(preset: str) -> dict:
        if preset not in done:
            shrink = SHRINK.get(preset, [*SHRUNK_TINY, f"corpus.path={small_corpus}", *EVALUATION])
            overrides = [f"experiment={preset}", *shrink, f"paths.data_dir={root}/data",
                         f"tracking.uri=sqlite:///{root}/{preset}.db", "progress=false"]  # fmt: skip
            with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                cfg = compose(config_name="config", overrides=overrides)
            run(cfg, output_dir=root / preset)
            client = MlflowClient(f"sqlite:///{root}/{preset}.db")
            experiment = client.get_experiment_by_name("garden").experiment_id
            done[preset] = {r.info.run_name: r for r in client.search_runs([experiment])} | {
                "_client": client
            }
        return done[preset]

    return run_preset


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_and_finishes(preset_runs, preset):
    runs = {name: run for name, run in preset_runs(preset).items() if name != "_client"}
    assert runs and all(run.info.status == "FINISHED" for run in runs.values()), preset
    assert all(run.data.metrics for run in runs.values()), preset


def test_tending_stability_records_per_and_cka_on_the_evaluation_steps(preset_runs):
    runs = preset_runs("tending_stability")
    client, tending = runs["_client"], runs["tiny/deduped/unembedding"]
    for key in ("per_mlp.0", "per_ov.1", "per_ov.1.0", "cond_mlp.1", "cka_attn.0", "cka_mlp.1", "perplexity"):
        history = client.get_metric_history(tending.info.run_id, f"eval/{key}")
        assert sorted(m.step for m in history) == EVAL_STEPS, key
    cka_final = {m.step: m.value for m in client.get_metric_history(tending.info.run_id, "eval/cka_mlp.1")}
    assert cka_final[40] == pytest.approx(1.0)
    assert "summary/cka_mlp_converged_fraction" in tending.data.metrics
    figures = {a.path for a in client.list_artifacts(tending.info.run_id, "figures")}
    assert {
        "figures/cka_percentiles.png",
        "figures/per_by_layer.png",
        "figures/convergence_vs_per.png",
    } <= figures


def test_forking_perplexity_records_perplexity_and_lambada_beside_the_fork(preset_runs):
    runs = preset_runs("forking_perplexity")
    client, paper1 = runs["_client"], runs["tiny/standard/unembedding"]
    for key in ("perplexity", "lambada_perplexity", "lambada_accuracy"):
        assert len(client.get_metric_history(paper1.info.run_id, f"eval/{key}")) == len(EVAL_STEPS), key
    assert "summary/steepest_perplexity_drop_step" in paper1.data.metrics
    ppl = {m.step: m.value for m in client.get_metric_history(paper1.info.run_id, "eval/perplexity")}
    assert ppl[40] < ppl[0]
    assert "figures/perplexity.png" in {a.path for a in client.list_artifacts(paper1.info.run_id, "figures")}


def test_cooccurrence_logs_both_phases_and_analyses_the_snapshots(preset_runs):
    runs = preset_runs("cooccurrence")
    client = runs["_client"]
    train, dynamics = runs["cooccurrence/standard/train"], runs["cooccurrence/standard/W_V"]
    for key in ("loss", "loss_both", "loss_only_1", "score_12", "score_32", "G_mu3", "gradient_balance",
                "rel_change_W_V"):  # fmt: skip
        assert len(client.get_metric_history(train.info.run_id, f"train/{key}")) > 20, key
    summaries = {"summary/phase1_end_epoch", "summary/attention_move_epoch", "summary/final_loss"}
    assert summaries <= set(train.data.metrics)
    # The analysis of its snapshots is the training run's child.
    assert dynamics.data.tags["mlflow.parentRunId"] == train.info.run_id
    figures = {a.path for a in client.list_artifacts(train.info.run_id, "figures")}
    assert {"figures/attention_scores.png", "figures/class_losses.png"} <= figures
    assert dynamics.data.tags["garden.tensor"] == "W_V"
    assert sorted(
        m.step for m in client.get_metric_history(dynamics.info.run_id, "diffusion/msd")
    ) == co.snapshot_steps(600, 500)
