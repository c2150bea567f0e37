"""Task `early_stop`: the paper's open check, "an early-stopping method based on the bifurcation point:
does it reduce compute while keeping model quality?", on garden's tiny series.

For each seed the tiny series trains once to the end (a child run: the whole dynamics job, with held-out
perplexity and LAMBADA-format accuracy at every checkpoint interval). Each rule then says where it would
have stopped that training:

- `stationary`, `unit_bifurcation`: the live monitor (`garden.monitor`, causal) run over the checkpoints
  in order, observing every `model.train.interval` steps. A training the monitor stops writes the same
  checkpoints as the full training up to its stop (byte for byte, tested), so the monitor replayed on the
  full training's checkpoints decides as it would have live; with `early_stop.verify` the first seed also
  trains with each monitor rule for real, and the job fails unless it stops at the same step.
- `validation_loss`: `transformers.EarlyStoppingCallback`'s semantics on the held-out loss (log of the
  perplexity) at each evaluation: the patience counter resets when the loss improves on the best by more
  than `val_threshold`, the best follows any improvement, and the training stops when the counter
  reaches `val_patience`.

Per seed and rule: the stop step, the share of training compute saved (steps not trained), perplexity
and accuracy at the stop against the end, and the offline stationary step. One parent MLflow run, a child
per seed (the full training) and per seed and rule; `tables/early_stop.csv` and a figure (compute saved
against perplexity lost).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from garden.errors import GardenError
from garden.record import SUMMARY, aligned_rows, run_params
from garden.settings import Settings, StepSettings, TinyTraining
from garden.settings.declare import STOP_RULES
from garden.tasks.dynamics import output_folder, run_dynamics
from garden.tasks.registry import register
from garden.tracking import MlflowTracker, with_swept_overrides

log = logging.getLogger("garden")
HEAD = "embed_out.weight"  # the tiny series' unembedding, as its checkpoints store it


def seed_settings(settings: Settings, seed: int) -> Settings:
    """The full training of one seed: no stop rule, evaluated at every checkpoint interval."""
    from garden.tiny import checkpoint_steps

    model = settings.model
    train = replace(model.train, seed=seed, stop_on=None, every=None)
    interval = int(train.interval)
    steps = checkpoint_steps(train)
    evaluated = sorted({step for step in steps if step % interval == 0} | {steps[-1]})
    evaluation = replace(
        settings.evaluation,
        stages=("perplexity", "lambada"),
        steps=StepSettings(select="list", values=tuple(evaluated)),
    )
    tracking = replace(settings.tracking, run_name=f"early_stop/seed{seed}/full")
    return replace(
        settings,
        task="dynamics",
        seed=seed,
        model=replace(model, train=train),
        evaluation=evaluation,
        tracking=tracking,
    )


def rule_training(settings: Settings, seed_run: Settings, rule: str | None) -> TinyTraining:
    """The seed's training with a monitor rule: the monitor every checkpoint interval, the rules' patience
    and min_step (what the replay observes and what `verify` trains)."""
    rules = settings.early_stop
    train = seed_run.model.train
    return replace(train, stop_on=rule, every=int(train.interval), patience=rules.patience,
                   min_step=rules.min_step)  # fmt: skip


def monitor_stops(
    settings: Settings, seed_run: Settings, steps: list[int]
) -> dict[str, tuple[int, int] | None]:
    """{rule: (declared at, dated from)} of the tiny training's own live monitor (`rule_training`) run over
    the full training's checkpoints at `steps`; None where never declared."""
    from garden.sources import open_series
    from garden.tiny import live_monitor

    series = open_series(seed_run)
    holder = torch.nn.Module()
    holder.embed_out = torch.nn.Module()
    holder.embed_out.weight = torch.nn.Parameter(series.read_tensor(steps[0], HEAD), requires_grad=False)
    monitor = live_monitor(holder, rule_training(settings, seed_run, None), settings.metrics, report=False)
    for step in steps:
        holder.embed_out.weight.data = series.read_tensor(step, HEAD)
        monitor.observe(step)
    events = monitor.watched[0].events
    return {
        rule: (events[rule].declared_step, events[rule].from_step) if rule in events else None
        for rule in STOP_RULES
    }


def validation_loss_stop(
    steps: list[int], losses: list[float], patience: int, threshold: float
) -> int | None:
    """Where `transformers.EarlyStoppingCallback` stops on these evaluations (lower loss is better)."""
    best, waited = None, 0
    for step, loss in zip(steps, losses, strict=True):
        if best is None or (loss < best and best - loss > threshold):
            waited = 0
        else:
            waited += 1
        if best is None or loss < best:
            best = loss
        if waited >= patience:
            return step
    return None


def verify_stop(settings: Settings, seed_run: Settings, rule: str, expected: int | None) -> int:
    """Train the seed with `rule` for real (`rule_training`) and check that it stops at `expected` (the
    end of the schedule when the replay declared nothing)."""
    from garden.sources import open_series
    from garden.tiny import checkpoint_steps

    train = rule_training(settings, seed_run, rule)
    series = open_series(replace(seed_run, model=replace(seed_run.model, train=train)))
    series.prepare()
    stopped = series.steps()[-1]
    wanted = expected if expected is not None else checkpoint_steps(train)[-1]
    if stopped != wanted:
        raise GardenError(
            f"early_stop.verify: the training with stop_on={rule} stopped at step {stopped}, the "
            f"rule replayed on the full training says {wanted}"
        )
    return stopped


def _row(
    seed: int,
    rule: str,
    stop: int | None,
    declared_from: int | None,
    evaluation: pd.DataFrame,
    total: int,
    offline_stationary: float | None,
) -> dict:
    at_end = evaluation.iloc[-1]
    step = total if stop is None else stop
    at_stop = evaluation.set_index("step").loc[step]
    return {
        "seed": seed,
        "rule": rule,
        "stopped": stop is not None,
        "stop_step": step,
        "event_from_step": declared_from,
        "compute_saved": 1.0 - step / total,
        "heldout_perplexity_at_stop": float(at_stop["perplexity"]),
        "heldout_perplexity_at_end": float(at_end["perplexity"]),
        "perplexity_lost": float(at_stop["perplexity"] / at_end["perplexity"] - 1.0),
        "lambada_accuracy_at_stop": float(at_stop["lambada_accuracy"]),
        "lambada_accuracy_at_end": float(at_end["lambada_accuracy"]),
        "offline_stationary_step": offline_stationary,
    }


@register("early_stop")
def run_early_stop(settings: Settings, output_dir: Path | None = None) -> pd.DataFrame:
    """Every seed's full training and each rule's stop on it, under one parent run; returns the table."""
    rules = settings.early_stop
    output_dir = Path(output_dir) if output_dir is not None else output_folder(settings)
    tracker = MlflowTracker(settings.tracking.uri, settings.tracking.experiment)
    run_name = with_swept_overrides("early_stop/tiny")
    tables, figures = output_dir / "tables", output_dir / "figures"
    with tracker.parent(
        run_name, {"garden.task": "early_stop", "garden.model": settings.model.name}
    ) as parent:
        tracker.log_to(
            parent,
            params=run_params(settings, ["early_stop", "model", "metrics", "evaluation"], {}),
            tags={
                "mlflow.note.content": f"**{run_name}**: the live monitor's stop rules against "
                "validation-loss early stopping. Running."
            },
        )
        rows: list[dict] = []
        for index, seed in enumerate(rules.seeds):
            verify = rules.verify and index == 0
            rows += _one_seed(settings, seed, output_dir / f"seed{seed}", tracker, parent, verify)
        table = pd.DataFrame(rows)
        tables.mkdir(parents=True, exist_ok=True)
        table.to_csv(tables / "early_stop.csv", index=False)
        if settings.figures:
            from garden.figures import draw_early_stop

            draw_early_stop(table, figures)
        means = table.groupby("rule", sort=False)[["compute_saved", "perplexity_lost"]].mean()
        lines = [
            (
                str(rule),
                f"saves {row['compute_saved']:.0%} of the training, held-out perplexity "
                f"{row['perplexity_lost']:+.1%} against the end",
            )
            for rule, row in means.iterrows()
        ]
        note = f"**{run_name}**: mean over {len(rules.seeds)} seeds\n\n" + "\n".join(
            f"- {r}: {t}" for r, t in lines
        )
        tracker.log_to(
            parent,
            summary={
                f"{SUMMARY}{rule}_{name}": float(value)
                for rule, row in means.iterrows()
                for name, value in row.items()
            },
            tags={"mlflow.note.content": note},
            artifacts={"tables": tables, "figures": figures},
        )
    log.info("%s finished (%s):\n%s", run_name, tables / "early_stop.csv", aligned_rows(lines))
    return table


def _one_seed(settings: Settings, seed: int, folder: Path, tracker: MlflowTracker, parent: str,
              verify: bool) -> list[dict]:  # fmt: skip
    """The seed's full training (a dynamics child run), then each rule's stop on it (a child run each)."""
    rules = settings.early_stop
    seed_run = seed_settings(settings, seed)
    outcome = run_dynamics(seed_run, folder / "full", parent_run_id=parent)
    evaluation = pd.read_csv(folder / "full" / "tables" / "evaluation.csv").sort_values("step")
    evaluation = evaluation.reset_index(drop=True)
    total = int(evaluation["step"].iloc[-1])
    steps = [int(s) for s in evaluation["step"]]
    offline = outcome.summary.get("stationary_step")
    stops = monitor_stops(settings, seed_run, steps)
    after_start = evaluation[evaluation["step"] > 0]
    losses = [math.log(p) for p in after_start["perplexity"]]
    val_stop = validation_loss_stop(
        list(after_start["step"]), losses, rules.val_patience, rules.val_threshold
    )
    rows = []
    for rule in rules.rules:
        validation = None if val_stop is None else (val_stop, val_stop)
        event = stops.get(rule) if rule in STOP_RULES else validation
        stop, dated = (None, None) if event is None else event
        if verify and rule in STOP_RULES:
            verify_stop(settings, seed_run, rule, stop)
        row = _row(seed, rule, stop, dated, evaluation, total, offline)
        row["verified"] = verify and rule in STOP_RULES
        rows.append(row)
        with tracker.start(
            f"early_stop/seed{seed}/{rule}", {"garden.task": "early_stop", "garden.rule": rule}, parent
        ):
            tracker.log_params({"seed": str(seed), "rule": rule})
            tracker.log_summary(
                {
                    f"{SUMMARY}{k}": float(v)
                    for k, v in row.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                }
            )
    return rows
