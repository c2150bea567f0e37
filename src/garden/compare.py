"""`python -m garden.compare`: one view of a sweep's runs, read back from MLflow.

    python -m garden.compare                          # the latest sweep (`python -m garden -m ...`)
    python -m garden.compare --sweep-dir multirun/2026-11-22_10-00-00
    python -m garden.compare --parent <run id>        # or --runs <id> <id> ..., or --dvc study/sweep
    python -m garden.compare --scan                   # a sharded scan's runs (task=scan) as one map

Writes a table (one row per run: model, variant, layer, size, pooled and per-unit bifurcation steps,
final share of bimodal units, stationary step, alpha, final perplexity) and figures (each bifurcation
step vs model size with a power-law fit; MSD, bimodality, bimodal-unit fraction and perplexity curves
overlaid), and logs them to the sweep's parent run, or to a new `compare` run when the
runs have no common parent (the DVC matrix).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from garden import families
from garden.errors import GardenError
from garden.figures import save_figures, step_axis
from garden.metrics import HEADLINE
from garden.record import FACTS, fact_params, logged_value, summary_metrics
from garden.tracking import PARENT_RUN_FILE

log = logging.getLogger("garden")

#: The overlaid per-step curves: logged key -> what it is (runs logged before the namespaces had the bare
#: key, which is read when the namespaced one is absent).
CURVES = {
    "diffusion/msd": "mean square displacement",
    "bimodality/bimodality_coefficient": "bimodality coefficient",
    "units/bimodal_unit_fraction": "fraction of bimodal units",
    "eval/perplexity": "held-out perplexity",
}
#: Params that differ between runs without being a setting of the study (never a swept-key column).
NOT_SETTINGS = ("resolved.", "paths.", "tracking.", "hydra.", "model.path", "progress", "figures")
# The onsets fitted against model size: (summary key, prefix of the fit's keys, what it is).
ONSETS = (
    ("bifurcation_step", "powerlaw", "pooled bifurcation step"),
    ("unit_bifurcation_step", "unit_powerlaw", "unit bifurcation step"),
)


def model_size(params: dict[str, str]) -> float | None:
    """Parameters of the run's model from its logged architecture, counted as its family counts them
    (`model.family`; runs logged before families were GPT-NeoX)."""
    prefix = "model.architecture."
    architecture = {}
    for key, value in params.items():
        if key.startswith(prefix):
            try:
                architecture[key[len(prefix) :]] = int(value)
            except ValueError:
                continue
    family = families.FAMILIES.get(params.get("model.family") or "gpt_neox")
    return None if family is None else family.parameter_count(architecture)


def power_law_fit(sizes: np.ndarray, steps: np.ndarray, prefix: str = "powerlaw") -> dict[str, float] | None:
    """Least squares of log(step) on log(size): step = prefactor · size^exponent, as `<prefix>_*` keys.
    None below two distinct sizes (or any non-positive value), where no line is defined."""
    ok = np.isfinite(sizes) & np.isfinite(steps) & (sizes > 0) & (steps > 0)
    x, y = np.log(sizes[ok]), np.log(steps[ok])
    if len(np.unique(x)) < 2:
        return None
    exponent, intercept = np.polyfit(x, y, 1)
    fitted = exponent * x + intercept
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - fitted) ** 2)) / total if total > 0 else 1.0
    return {f"{prefix}_exponent": float(exponent), f"{prefix}_prefactor": float(math.exp(intercept)),
            f"{prefix}_r2": r2, f"{prefix}_points": float(ok.sum())}  # fmt: skip


@dataclass
class Selection:
    """The runs to compare and where the comparison is logged (`parent_id` None: a new run)."""

    runs: list[Run]
    parent_id: str | None
    label: str


def select_runs(client: MlflowClient, experiment: str, parent: str | None = None,
                sweep_dir: str | None = None, run_ids: list[str] | None = None,
                dvc_dir: str | None = None) -> Selection:  # fmt: skip
    """The runs named by exactly one of the options; none given: the latest sweep of the experiment."""
    if sweep_dir:
        marker = Path(sweep_dir) / PARENT_RUN_FILE
        if not marker.is_file():
            raise GardenError(
                f"{marker} not found: --sweep-dir takes the folder of a `python -m garden -m` sweep"
            )
        parent = marker.read_text().strip()
    if dvc_dir:
        files = sorted(Path(dvc_dir).glob("*/run.json"))
        if not files:
            raise GardenError(f"no */run.json under {dvc_dir}: run the DVC matrix stage `sweep` first")
        run_ids = [json.loads(f.read_text())["run_id"] for f in files]
    if run_ids:
        runs = [_get_run(client, run_id) for run_id in run_ids]
        return Selection(runs, None, f"{len(runs)} runs")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise GardenError(f"MLflow experiment {experiment!r} not found at {client.tracking_uri}")
    if parent is None:
        sweeps = client.search_runs([exp.experiment_id], "tags.`garden.sweep` = 'parent'",
                                    order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
        if not sweeps:
            raise GardenError(
                f"no sweep in experiment {experiment!r}: run `python -m garden -m ...`, or name the runs "
                "with --parent, --sweep-dir, --runs or --dvc"
            )
        parent = sweeps[0].info.run_id
    parent_run = _get_run(client, parent)
    children = client.search_runs([parent_run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'",
                                  order_by=["attributes.start_time ASC"])  # fmt: skip
    if not children:
        raise GardenError(f"the sweep run {parent} ({parent_run.info.run_name}) has no child runs yet")
    return Selection(children, parent, parent_run.info.run_name or parent)


def _get_run(client: MlflowClient, run_id: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as error:
        raise GardenError(f"MLflow run {run_id!r} not found at {client.tracking_uri}") from error


def _override_keys(params: dict[str, str]) -> list[str]:
    """The keys a run's command line set (its `hydra.overrides` param), in order."""
    text = params.get("hydra.overrides", "")
    return [item.split("=", 1)[0].lstrip("+~") for item in text.split() if "=" in item]


def _setting(params: dict[str, str], key: str) -> str | None:
    """A run's value of a setting: a param, or the option chosen for a config group (`model=...`)."""
    return params.get(key, params.get(f"hydra.choices.{key}"))


def swept_keys(runs: list[Run]) -> list[str]:
    """The settings the runs differ in: keys their command lines set with different values (a sweep's
    `-m` keys); for runs without Hydra's record (the DVC matrix), the params that differ."""
    all_params = [run.data.params for run in runs]
    candidates = list(dict.fromkeys(k for p in all_params for k in _override_keys(p)))
    if not candidates:
        candidates = sorted({k for p in all_params for k in p if not k.startswith("model.architecture.")})
    return [key for key in candidates if not key.startswith(NOT_SETTINGS)
            and len({_setting(p, key) for p in all_params}) > 1]  # fmt: skip


def comparison_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run, keyed by its run id: identity, a column per swept key, the headline numbers
    (an event looked for and not reached reads NaN here; its tag says which)."""
    swept = swept_keys(runs)
    rows = []
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        rows.append({
            "run_id": run.info.run_id,
            "run_name": run.data.tags.get("garden.job", run.info.run_name),  # without a cached rerun's mark
            "status": run.info.status,
            "model": params.get("model.name"),
            "variant": params.get("variant"),
            "layer": params.get("layer.name"),
            **{key: _setting(params, key) for key in swept if key not in ("model", "variant", "layer")},
            "model_size": model_size(params),
            **{key: logged_value(metrics, key) for key in HEADLINE},
        })  # fmt: skip
    return pd.DataFrame(rows)


def curve_labels(table: pd.DataFrame) -> dict[str, str]:
    """A legend label per run id: its name, plus its short id where two runs share a name."""
    counts = table["run_name"].value_counts()
    return {row.run_id: row.run_name if counts[row.run_name] == 1 else f"{row.run_name} ({row.run_id[:7]})"
            for row in table.itertuples()}  # fmt: skip


def curves(client: MlflowClient, runs: list[Run]) -> dict[str, dict[str, pd.DataFrame]]:
    """{metric: {run id: (step, value) table}} for the overlaid curves, from the runs' histories."""
    out: dict[str, dict[str, pd.DataFrame]] = {name: {} for name in CURVES}
    for run in runs:
        for name in CURVES:
            logged = name if name in run.data.metrics else name.split("/", 1)[1]
            if logged not in run.data.metrics:
                continue
            history = client.get_metric_history(run.info.run_id, logged)
            table = pd.DataFrame({"step": [m.step for m in history], "value": [m.value for m in history]})
            out[name][run.info.run_id] = table.sort_values("step")
    return out


def draw(table: pd.DataFrame, histories: dict, fits: dict, label: str) -> dict:
    """The onsets against model size (only when the runs span two sizes or more), and the overlays."""
    figures = {}
    sizes = table["model_size"].dropna().unique()
    for key, prefix, what in ONSETS if len(sizes) >= 2 else ():
        fit = fits.get(prefix)
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        found = table.dropna(subset=["model_size", key])
        for variant, group in found.groupby("variant"):
            ax.scatter(group["model_size"], group[key], label=variant, zorder=3)
        if fit is not None:
            grid = np.geomspace(found["model_size"].min(), found["model_size"].max(), 50)
            exponent = fit[f"{prefix}_exponent"]
            label_fit = f"step ∝ size^{exponent:.2f} (R² {fit[f'{prefix}_r2']:.2f})"
            ax.plot(grid, fit[f"{prefix}_prefactor"] * grid**exponent, "k--", label=label_fit)
        missing = table[table[key].isna()]
        if len(missing):
            ax.text(0.02, 0.02, f"no {what}: " + ", ".join(missing["run_name"].astype(str)),
                    transform=ax.transAxes, fontsize=7, va="bottom")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model size (parameters)")
        ax.set_ylabel(what)
        ax.set_title(f"{what.capitalize()} vs model size\n{label}")
        if len(found) or fit is not None:
            ax.legend()
        figures[f"{key.removesuffix('_step')}_vs_size.png"] = fig
    labels = curve_labels(table)
    for name, by_run in histories.items():
        if not by_run:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for run_id, curve in by_run.items():
            if name == "diffusion/msd":  # log-log: step 0 (and its zero MSD) has no place on it
                curve = curve[(curve["step"] > 0) & (curve["value"] > 0)]
            ax.plot(curve["step"], curve["value"], marker=".", label=labels.get(run_id, run_id))
        if name == "diffusion/msd":
            ax.set_xscale("log")
            ax.set_xlabel("training step (log; step 0 is the reference)")
        else:
            step_axis(ax)
        if name in ("diffusion/msd", "eval/perplexity"):
            ax.set_yscale("log")
        if name == "bimodality/bimodality_coefficient":
            ax.axhline(5 / 9, color="grey", linestyle=":", label="5/9 (uniform)")
        if name == "units/bimodal_unit_fraction":
            ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(CURVES[name])
        ax.set_title(f"{CURVES[name].capitalize()} over training\n{label}")
        ax.legend(fontsize=7)
        figures[f"{name.split('/', 1)[1]}_overlay.png"] = fig
    return figures


def compare(tracking_uri: str, experiment: str, output: Path | None = None, **selection) -> Path:
    """Read the runs, write table and figures under `output`, log them to the parent (or a new run)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    chosen = select_runs(client, experiment, **selection)
    table = comparison_table(chosen.runs)
    unfinished = table.loc[table["status"] != "FINISHED", "run_name"].tolist()
    if unfinished:
        log.warning("runs not FINISHED (kept in the table, left out of the fit): %s", ", ".join(unfinished))
    finished = table[table["status"] == "FINISHED"]
    sizes = finished["model_size"].to_numpy(float)
    fits = {}
    for key, prefix, what in ONSETS:
        fits[prefix] = power_law_fit(sizes, finished[key].to_numpy(float), prefix)
        if fits[prefix] is None and len(np.unique(sizes[np.isfinite(sizes)])) >= 2:
            log.warning("no power-law fit of the %s: it needs one at two or more model sizes", what)
    fit = {k: v for found in fits.values() if found for k, v in found.items()}
    folder = Path(output) if output else Path("outputs") / "compare" / (chosen.parent_id or "runs")
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "comparison.csv", index=False)
    (folder / "fit.json").write_text(json.dumps(fit or {}, indent=1))
    finished_runs = [r for r in chosen.runs if r.info.status == "FINISHED"]
    save_figures(draw(finished, curves(client, finished_runs), fits, chosen.label), folder / "figures")

    if chosen.parent_id is not None:
        target = chosen.parent_id
    else:
        exp = client.get_experiment_by_name(experiment) or client.get_experiment(
            chosen.runs[0].info.experiment_id
        )
        tags = {"garden.compare": ",".join(table["run_id"])}
        target = client.create_run(exp.experiment_id, run_name="compare", tags=tags).info.run_id
    client.log_artifacts(target, str(folder), "comparison")
    for key, value in (fit or {}).items():
        client.log_metric(target, key, value)
    client.set_tag(target, "garden.compared_runs", str(len(table)))
    if chosen.parent_id is None:
        client.set_terminated(target, "FINISHED")
    log.info("compared %d runs (%s); table and figures in %s, logged to MLflow run %s",
             len(table), chosen.label, folder, target)  # fmt: skip
    return folder


def merge_scans(tracking_uri: str, experiment: str, output: Path | None = None, **selection) -> Path:
    """The shards of a scan (`task=scan` runs, typically `scan.blocks=0:6,6:12` in a sweep) as one scan:
    their tables joined, keyed by run id, and the map drawn again from them (`tasks.scan.write_scan`), then
    logged to the sweep's parent run (or a new `compare-scan` run)."""
    import tempfile

    from garden.tasks.scan import read_scan_tables, write_scan

    client = MlflowClient(tracking_uri=tracking_uri)
    chosen = select_runs(client, experiment, **selection)
    shards = [r for r in chosen.runs if r.data.tags.get("garden.task") == "scan"]
    if not shards:
        raise GardenError(f"none of the {len(chosen.runs)} runs of {chosen.label} is a scan (task=scan)")
    unfinished = [r.info.run_name for r in shards if r.info.status != "FINISHED"]
    if unfinished:
        raise GardenError(f"scan shards not FINISHED: {', '.join(unfinished)}; run them again (a scan "
                          "resumes from its cache) before merging")  # fmt: skip
    series = {r.data.tags.get("garden.series") for r in shards}
    if len(series) > 1:
        raise GardenError(f"the shards scan different series ({', '.join(sorted(map(str, series)))}); "
                          "merge the shards of one series")  # fmt: skip
    summaries, long_tables = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for run in shards:
            local = Path(client.download_artifacts(run.info.run_id, "tables", f"{scratch}/{run.info.run_id}"))
            summary, steps = read_scan_tables(local.parent)
            summaries.append(summary.assign(run_id=run.info.run_id))
            long_tables.append(steps.assign(run_id=run.info.run_id))
    summary = pd.concat(summaries, ignore_index=True)
    repeated = summary["tensor"].duplicated()
    if repeated.any():
        log.warning("tensors scanned by more than one shard (the first shard's kept): %s",
                    ", ".join(summary.loc[repeated, "tensor"]))  # fmt: skip
        summary = summary[~repeated]
        first = dict(zip(summary["tensor"], summary["run_id"], strict=True))
        long_tables = [t[t["tensor"].map(first) == t["run_id"]] for t in long_tables]
    summary = _map_order(summary)
    position = {tensor: i for i, tensor in enumerate(summary["tensor"])}
    steps = pd.concat(long_tables, ignore_index=True)
    steps = steps.iloc[np.argsort(steps["tensor"].map(position).to_numpy(), kind="stable")]
    steps = steps.reset_index(drop=True)
    folder = Path(output) if output else Path("outputs") / "compare" / f"scan-{chosen.parent_id or 'runs'}"
    values = write_scan(folder, summary.reset_index(drop=True), steps, f"{chosen.label} (merged scan)")
    (folder / "scan_aggregates.json").write_text(json.dumps(values, indent=1))
    if chosen.parent_id is not None:
        target = chosen.parent_id
    else:
        exp = client.get_experiment(shards[0].info.experiment_id)
        tags = {"garden.compare": ",".join(r.info.run_id for r in shards), "garden.task": "scan_merge"}
        target = client.create_run(exp.experiment_id, run_name="compare-scan", tags=tags).info.run_id
    client.log_artifacts(target, str(folder), "scan")
    for key, value in summary_metrics(values, {}).items():
        client.log_metric(target, key, value)
    for key, value in fact_params(values).items():  # tags, not params: a merge may be made again
        client.set_tag(target, f"garden.{key.removeprefix(FACTS)}", value)
    client.set_tag(target, "garden.scan_shards", str(len(shards)))
    if chosen.parent_id is None:
        client.set_terminated(target, "FINISHED")
    log.info("merged %d scan shards (%d tensors, %s); tables and figures in %s, logged to MLflow run %s",
             len(shards), len(summary), chosen.label, folder, target)  # fmt: skip
    return folder


def _map_order(summary: pd.DataFrame) -> pd.DataFrame:
    """Rows in the order a single scan writes them: by role (the registry's order), then block."""
    roles = list(families.ROLES)
    rank = summary["role"].map(lambda r: roles.index(r) if isinstance(r, str) and r in roles else len(roles))
    return summary.assign(_rank=rank).sort_values(["_rank", "block"], kind="stable",
                                                  na_position="first").drop(columns="_rank")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m garden.compare", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--parent", help="the sweep's MLflow parent run id")
    which.add_argument("--sweep-dir", help="a sweep folder (multirun/<time>) holding mlflow_parent_run_id")
    which.add_argument("--runs", nargs="+", metavar="RUN_ID", help="these runs")
    which.add_argument("--dvc", metavar="DIR", help="the DVC matrix's runs (study/sweep)")
    parser.add_argument("--scan", action="store_true", help="merge the runs' scans (task=scan shards) into "
                        "one map instead of comparing them")  # fmt: skip
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="garden")
    parser.add_argument("--output", type=Path, help="folder for the table and figures "
                        "(default outputs/compare/<parent run id>)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    try:
        job = merge_scans if args.scan else compare
        job(args.tracking_uri, args.experiment, args.output, parent=args.parent, sweep_dir=args.sweep_dir,
            run_ids=args.runs, dvc_dir=args.dvc)  # fmt: skip
    except GardenError as error:
        sys.exit(f"garden: error: {error}")


if __name__ == "__main__":
    main()
