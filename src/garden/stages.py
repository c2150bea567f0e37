"""The DVC pipeline's stages (`dvc.yaml`): the CLI's job cut at the points where DVC should cache.

    python -m garden.stages corpus|series|extract|metrics|evaluate|report [--series DIR ...] [--out DIR]
    python -m garden.stages sweep --model tiny --variant deduped
    python -m garden.stages scan --blocks 0:2            # one shard of the whole-model scan

Each stage reads `params.yaml` (the composed `conf/study.yaml`, rewritten by `dvc exp run -S ...`) into
Settings (garden.settings: every setting checked as the CLI checks it), takes
its input and output folders as arguments (dvc.yaml names them; the defaults are the study's layout) and
calls the same stage functions as `python -m garden` (`garden.tasks.dynamics`, `garden.analysis`,
`garden.record`); by default its outputs live under `paths.data_dir` (`study/`):

    corpus/       the verified corpus archive          series/       the series (tiny: trained here)
    trajectory/   the extracted trajectory + job       metrics/      tables, figures, summary.json
    evaluation/   model-level tables and figures       report/       everything, as logged to MLflow
    metrics.json  the headline numbers (dvc metrics)   sweep/<model>-<variant>/   one full run each

The extraction and evaluation caches (`extract/`, `evaluate/`) and the sweep's own tiny series
(`trained/`) are keyed by what they depend on and are left out of DVC on purpose: an interrupted stage
resumes from them, a rerun does not retrain, and DVC still decides what reruns.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from garden.errors import GardenError
from garden.settings import Settings, resolve

log = logging.getLogger("garden")

PARAMS_FILE = "params.yaml"
# Where dvc.yaml names the stages' outputs (paths.data_dir of conf/study.yaml).
STUDY_DIR = "study"
# The config DVC composes (`.dvc/config`: hydra.config_name) and `make params` writes to params.yaml.
STUDY_CONFIG = "study"


def load_params(path: str | Path = PARAMS_FILE) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise GardenError(f"{path} not found; run the stages from the repository root (dvc repro)")
    return OmegaConf.load(path)


def compose_study(overrides: list[str] | None = None) -> DictConfig:
    """conf/study.yaml composed with Hydra overrides and resolved: what DVC writes to params.yaml."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from garden.config import config_dir

    try:
        with initialize_config_dir(str(config_dir()), version_base=None):
            cfg = compose(config_name=STUDY_CONFIG, overrides=list(overrides or []))
    except HydraException as error:
        models = ", ".join(sorted(p.stem for p in (config_dir() / "model").glob("*.yaml")))
        raise GardenError(f"{str(error).splitlines()[0]} (models: {models})") from error
    OmegaConf.resolve(cfg)
    return cfg


def load_settings(path: str | Path = PARAMS_FILE) -> Settings:
    return resolve(load_params(path))


def data_dir(settings: Settings) -> Path:
    return Path(settings.paths.data_dir)


def tiny_series_path(settings: Settings) -> Path:
    """Where garden keeps a tiny series under `paths.data_dir`: `series/tiny[-variant]-<fingerprint>`,
    inside the `series` output. Keyed by what the weights depend on, so the persistent output resumes an
    interrupted training and a changed config starts a new folder."""
    from garden.tiny import tiny_series_dir

    return tiny_series_dir(settings.model, settings.corpus, data_dir(settings), settings.variant,
                           settings.metrics)  # fmt: skip


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=float))


def headline_value(key: str, summary: dict, tags: dict) -> float | str:
    """A headline number for `dvc metrics`, or what its absence means: "none" (an event looked for and
    not found) or "not computed" (its metric or stage was not run). DVC drops nulls from `dvc metrics
    show`; it shows these strings."""
    value = summary.get(key)
    if value is not None and math.isfinite(float(value)):
        return float(value)
    from garden.metrics import EVENT_TAGS

    return "none" if tags.get(EVENT_TAGS.get(key, "")) == "none" else "not computed"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise GardenError(f"{path} is missing: run the stage that writes it first (dvc repro)")
    return json.loads(path.read_text())


def corpus(settings: Settings, out: Path) -> None:
    """Fetch and verify the training text (a no-op listing for a user's own `corpus.path`)."""
    from garden.corpus import load_corpus

    texts = load_corpus(settings.corpus, data_dir(settings))
    listing = {"name": settings.corpus.name, "documents": len(texts), "characters": sum(map(len, texts))}
    _write_json(out / "corpus.json", listing)


def with_model_path(settings: Settings, path: Path | str) -> Settings:
    return replace(settings, model=replace(settings.model, path=str(path)))


def with_series_in(settings: Settings, folder: Path) -> Settings:
    """The settings whose tiny series lives in `folder` (the `series` stage's output), under the keyed
    name it has anywhere (`tiny[-variant]-<fingerprint>`); other sources are not moved."""
    if settings.model.source != "tiny" or settings.model.path:
        return settings
    return with_model_path(settings, Path(folder) / tiny_series_path(settings).name)


def series(settings: Settings, out: Path) -> None:
    """Open the series: the tiny one is trained (resumably) into the stage's output; a Hub or local
    series gets a manifest of its steps, so later stages rerun when it changes. Only the current series
    is kept in the (persistent) output."""
    from garden.cache import lock_path
    from garden.sources import open_series
    from garden.validation import check_environment

    check_environment(settings)
    folder = out
    settings = with_series_in(settings, folder)
    keep = tiny_series_path(settings) if settings.model.source == "tiny" else None
    for stale in folder.glob("*") if folder.is_dir() else []:
        if keep is not None and stale in (keep, lock_path(keep)):
            continue  # the current series, maybe half-trained: it resumes (its lock stays with it)
        if stale.is_dir():  # another config's series (the output persists between runs)
            shutil.rmtree(stale)
        else:
            stale.unlink()
    if keep is not None:
        reuse_trained(keep)
    opened = open_series(settings)
    opened.prepare()  # the tiny series trains here (unless it was reused)
    if keep is None:
        manifest = {"series": opened.identity, "steps": opened.steps()}
        _write_json(folder / f"{settings.model.name}-{settings.variant}.json", manifest)


def reuse_trained(target: Path) -> None:
    """The same tiny series (the same keyed name: config, corpus content and trainer code) already
    trained by `python -m garden` under its data folder (GARDEN_DATA_DIR, else data/) is linked into the
    stage's output instead of trained again (hard links where the filesystem allows, else copies)."""
    from garden import cache
    from garden.tiny import COMPLETE_MARKER

    source = Path(os.environ.get("GARDEN_DATA_DIR") or "data") / "series" / target.name
    if (target / COMPLETE_MARKER).is_file() or not (source / COMPLETE_MARKER).is_file():
        return
    if source.resolve() == target.resolve():
        return
    with cache.producing(target, "the tiny series"):  # the lock a training job would hold
        if (target / COMPLETE_MARKER).is_file():
            return
        staged = cache.temporary_folder(target)
        shutil.copytree(source, staged, copy_function=_link_or_copy, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".*"))  # fmt: skip
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staged, target)
    log.info("the tiny series is the one already trained in %s: linked into %s, not trained again", source,
             target)  # fmt: skip


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, destination)


def extract(settings: Settings, series_dir: Path, out: Path) -> None:
    """The streaming pass: the trajectory of the configured tensor, with the job's provenance."""
    from garden.tasks.dynamics import extract_trajectory, job_summary, plan_dynamics

    job = plan_dynamics(with_series_in(settings, series_dir))
    folder = out
    trajectory = extract_trajectory(job)
    summary = job_summary(job, folder)
    trajectory.save(folder / "trajectory.npz")
    # The run's default name: tracking.run_name is the report's business (its own params).
    default_name = f"{settings.model.name}/{settings.variant}/{job.layer.label}"
    _write_json(folder / "job.json", {"run_name": default_name, "tags": job.tags, "summary": summary,
                                      "artifacts": [str(p) for p in job.series.artifacts()]})  # fmt: skip


def metrics(settings: Settings, trajectory_dir: Path, out: Path) -> None:
    """The metric registry on the trajectory: per-step tables, summary and the dynamics figures."""
    from garden.analysis import analyse, write_dynamics, write_summary
    from garden.metrics import step_metrics
    from garden.trajectory import Trajectory

    job = _read_json(trajectory_dir / "job.json")
    trajectory = Trajectory.load(trajectory_dir / "trajectory.npz")
    analysis = analyse(settings, trajectory, job["summary"])
    folder = out
    write_dynamics(folder, analysis, job["run_name"], settings)
    write_summary(folder, job["run_name"], analysis.summary, analysis.tags)
    # Which steps.csv column each logged per-step metric is (`diffusion/msd` <- msd), for the report.
    columns = {key: key.split("/", 1)[1] for key in step_metrics(analysis.results)}
    _write_json(folder / "per_step.json", {"logged": columns})


def evaluate(settings: Settings, series_dir: Path, metrics_dir: Path, out: Path) -> None:
    """The model-level evaluation (`evaluation=...`), marked with the bifurcation step; an empty summary
    when the study evaluates nothing."""
    from garden.tasks.dynamics import evaluate_models, plan_dynamics

    folder = out
    folder.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    if settings.evaluation.stages:
        recorded = _read_json(metrics_dir / "summary.json")
        excluded = re.findall(r"step(\d+):", recorded["tags"].get("garden.excluded_steps", ""))
        job = plan_dynamics(with_series_in(settings, series_dir))
        _, summary, _ = evaluate_models(job, folder, recorded["summary"], excluded)
    _write_json(folder / "summary.json", {"summary": summary})


def report(settings: Settings, trajectory_dir: Path, metrics_dir: Path, evaluation_dir: Path, out: Path,
           headline: Path) -> None:  # fmt: skip
    """One MLflow run holding the study (params, per-step metrics, summary, tables, figures), the same
    record `python -m garden` makes, logged only once every stage has finished."""
    from garden.analysis import write_summary
    from garden.metrics import HEADLINE
    from garden.record import describe, log_outcome, log_results, log_training_history, run_params
    from garden.series import TRAIN_LOG, read_training_log
    from garden.tasks.dynamics import used_groups
    from garden.tracking import MlflowTracker

    job = _read_json(trajectory_dir / "job.json")
    dynamics = _read_json(metrics_dir / "summary.json")
    evaluation = _read_json(evaluation_dir / "summary.json")["summary"]
    folder = out
    if folder.exists():
        shutil.rmtree(folder)
    for source in (metrics_dir, evaluation_dir, trajectory_dir):
        for kind in ("tables", "figures"):
            if (source / kind).is_dir():
                shutil.copytree(source / kind, folder / kind, dirs_exist_ok=True)
    (folder / "tables").mkdir(parents=True, exist_ok=True)
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    tracking = settings.tracking
    run_name = tracking.run_name or job["run_name"]
    summary = {**dynamics["summary"], **evaluation}
    tags = {**job["tags"], **dynamics["tags"], "garden.pipeline": "dvc"}
    write_summary(folder, run_name, summary, tags)

    steps_table = pd.read_csv(folder / "tables" / "steps.csv")
    per_step = {key: steps_table[column].to_numpy(dtype=float)
                for key, column in _read_json(metrics_dir / "per_step.json")["logged"].items()}  # fmt: skip
    eval_path = folder / "tables" / "evaluation.csv"
    eval_table = pd.read_csv(eval_path) if eval_path.is_file() else None
    train_log = next((Path(p) for p in job["artifacts"] if Path(p).name == TRAIN_LOG), None)
    tracker = MlflowTracker(tracking.uri, tracking.experiment)
    what = f"the dynamics of {tags.get('garden.tensor')} across {tags.get('garden.series')} (DVC study)"
    with tracker.start(run_name, tags):
        tracker.log_params(run_params(settings, [*used_groups(settings), "study"], {"output_dir": folder}))
        if train_log is not None:
            log_training_history(tracker, read_training_log(train_log))
        previews = log_results(tracker, folder, steps_table["step"].to_numpy(), per_step, eval_table, summary,
                               tags, job["artifacts"])  # fmt: skip
        tracker.set_description(describe(run_name, what, summary, tags, folder, previews=(tracker.run_id,
                                                                                          previews)))
    _write_json(folder / "run.json", {"run_id": tracker.run_id, "tracking_uri": tracking.uri,
                                      "experiment": tracking.experiment})  # fmt: skip
    _write_json(headline, {k: headline_value(k, summary, tags) for k in HEADLINE})
    log_outcome(run_name, summary, tags, folder, tracker.run_id, tracking.uri, tracking.experiment)


def sweep_config(settings: Settings, model: str, variant: str) -> Settings:
    """The study's settings for a model and variant: params.yaml's model when it is the same model (with
    any `-S model.*` changes), else the model group composed from conf/; every other value (layer,
    metrics, steps, ...) as params.yaml has it."""
    item = replace(settings, variant=variant, tracking=replace(settings.tracking, run_name=None))
    if model != settings.model.name:
        other = resolve(compose_study([f"model={model}", f"variant={variant}"]))
        item = replace(item, model=other.model, family=other.family)
    if item.model.source == "tiny" and not item.model.path:
        # Reuse the `series` stage's training when it is the same series (same keyed folder); otherwise
        # train into a keyed folder outside DVC's outputs, so a rerun of the item does not retrain.
        from garden.tiny import COMPLETE_MARKER

        trained = tiny_series_path(item)
        if (trained / COMPLETE_MARKER).is_file():
            return with_model_path(item, trained)
        return with_model_path(item, data_dir(settings) / "trained" / trained.name)
    return item


def sweep(settings: Settings, model: str, variant: str) -> None:
    """One item of the models x variants matrix: the whole CLI job, its results in the item's folder.
    Bad input fails in `run`'s checks, before any training or reading."""
    from garden.tasks import run

    item = sweep_config(settings, model, variant)
    folder = data_dir(settings) / "sweep" / f"{model}-{variant}"
    results = folder / "results"
    if results.exists():
        shutil.rmtree(results)
    outcome = run(item, output_dir=results)
    _write_json(folder / "run.json", {"run_id": outcome.run_id, "run_name": outcome.run_name,
                                      "tracking_uri": item.tracking.uri})  # fmt: skip


def scan(settings: Settings, series_dir: Path, out: Path, blocks: str | None = None) -> None:
    """One shard of the whole-model scan of the study's series (`scan.blocks`; all blocks when None): the
    scan job itself (`task=scan`), its tables, figures and MLflow run under `out`, and `run.json`, which
    `python -m garden.compare --scan --dvc <its parent>` reads to merge the shards into one map."""
    from garden.settings.models import BLOCKS
    from garden.tasks.scan import run_scan

    if blocks is not None and not BLOCKS.allows(blocks):
        raise GardenError(f"--blocks {blocks!r}: valid is {BLOCKS.describe}")
    item = with_series_in(settings, series_dir)
    shard = replace(item.scan, blocks=None if blocks is None else BLOCKS.convert(blocks))
    item = replace(item, task="scan", scan=shard, tracking=replace(item.tracking, run_name=None))
    if out.exists():
        shutil.rmtree(out)
    outcome = run_scan(item, output_dir=out)
    _write_json(out / "run.json", {"run_id": outcome["run_id"], "tracking_uri": item.tracking.uri})


#: stage -> (function, its folder arguments in order: inputs, then outputs); each folder argument is a
#: command-line option whose default is the study's layout under paths.data_dir.
STAGES = {
    "corpus": (corpus, ("out",)),
    "series": (series, ("out",)),
    "extract": (extract, ("series", "out")),
    "metrics": (metrics, ("trajectory", "out")),
    "evaluate": (evaluate, ("series", "metrics", "out")),
    "report": (report, ("trajectory", "metrics", "evaluation", "out", "headline")),
}
#: Where each folder argument points by default, under paths.data_dir (`out`: the stage's own folder).
LAYOUT = {"series": "series", "trajectory": "trajectory", "metrics": "metrics", "evaluation": "evaluation",
          "headline": "metrics.json"}  # fmt: skip
OUT = {"corpus": "corpus", "series": "series", "extract": "trajectory", "metrics": "metrics",
       "evaluate": "evaluation", "report": "report"}  # fmt: skip


def write_params(path: str | Path = PARAMS_FILE, overrides: list[str] | None = None) -> None:
    """params.yaml from conf/study.yaml, exactly as `dvc exp run` composes it (hydra.enabled)."""
    Path(path).write_text(OmegaConf.to_yaml(compose_study(overrides)), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m garden.stages", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=[*STAGES, "sweep", "scan", "params"])
    parser.add_argument("--blocks", help="scan: the shard's blocks, start:stop (default: all)")
    parser.add_argument("--model", help="sweep: a model of conf/model/")
    parser.add_argument("--variant", help="sweep: standard | deduped")
    parser.add_argument("--params", default=PARAMS_FILE, help="the parameters file (default params.yaml)")
    for name in ("series", "trajectory", "metrics", "evaluation", "out", "headline"):
        parser.add_argument(f"--{name}", type=Path, help=f"a stage's {name} folder (default: the study's)")
    parser.add_argument("overrides", nargs="*", help="params: Hydra overrides composed into params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    try:
        if args.stage == "params":
            write_params(args.params, args.overrides)
            return
        settings = load_settings(args.params)
        if Path(settings.paths.data_dir) != Path(STUDY_DIR):
            raise GardenError(
                f"paths.data_dir={settings.paths.data_dir!r}: the DVC stages write under {STUDY_DIR}/, where "
                "dvc.yaml names their outputs; keep paths.data_dir=study in params.yaml"
            )
        if args.stage == "sweep":
            if not args.model or not args.variant:
                parser.error("sweep needs --model and --variant")
            sweep(settings, args.model, args.variant)
        elif args.stage == "scan":
            root = data_dir(settings)
            scan(settings, args.series or root / "series", args.out or root / "scan" / (args.blocks or "all"),
                 args.blocks)  # fmt: skip
        else:
            function, folders = STAGES[args.stage]
            root = data_dir(settings)
            defaults = {**LAYOUT, "out": OUT[args.stage]}
            function(settings, *(getattr(args, name) or root / defaults[name] for name in folders))
    except GardenError as error:
        sys.exit(f"garden: error: {error}")


if __name__ == "__main__":
    main()
