"""The record of a dynamics job: what it logs to its (already started) MLflow run, under which names, and
the block a finished job prints (the CLI and the DVC `report` stage both use them).

Logged names (MLflow groups its charts by the part before the first `/`):

- `dist/…`, `diffusion/…`, `bimodality/…`, `units/…`: per-step series at `step=<training step>`, the
  namespace each metric registers with (`garden.metrics`);
- `eval/…`: the model-level evaluation (perplexity, LAMBADA, PER, CKA) at its steps;
- `train/loss`, `train/lr`: the tiny series' training, live while it trains;
- `summary/…`: one value per run, the results. Every summary a metric produced is logged, and the event
  steps (`summary/bifurcation_step`, `summary/unit_bifurcation_step`, `summary/stationary_step`) are
  logged whenever their metric ran: NaN when looked for and not reached (the tag `garden.<event>` says
  "none"; MLflow draws no bar for NaN and leaves it out of every comparison in a search) or not defined
  (units off, a distance to an event not reached). Counts and byte totals (`RUN_FACTS`) are params
  `run.<key>` instead: facts of the run, not results to chart;
- artifacts `figures/`, `tables/`, `summary.json`, and `previews/`: page-sized copies of the key figures,
  which the run's description shows under its headline sentence. (`mlflow.log_image` would put them in
  the "Model metrics" tab, but MLflow 3.17 prints every param of the run, 110 for a dynamics run, over
  each image there: the description is where they can be read.)
- `system/extract_…`: the extraction's progress and wall-clock time, in the "System metrics" tab (drawn
  against time, not the training step).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from garden.metrics import EVENT_TAGS
from garden.settings import GardenConfig, as_plain
from garden.tracking import MlflowTracker, flatten

log = logging.getLogger("garden")

#: What older runs logged for an event looked for and not reached (read back as NaN); runs now log NaN,
#: which MLflow neither draws as a bar down to -1 nor matches in a search's comparison.
NOT_FOUND = -1.0
SUMMARY = "summary/"
EVALUATION = "eval/"
#: Summary keys that count what a run covered or read, not results: logged as params `run.<key>`.
RUN_FACTS = frozenset({"n_steps", "n_parameters", "n_units", "n_duplicate_steps", "n_excluded_steps",
                       "msd_regimes", "hub_bytes_fetched", "hub_file_bytes", "scan_tensors"})  # fmt: skip
FACTS = "run."
#: The figures a dynamics run's description shows (those drawn): the fork per unit, the whole tensor's
#: fork, the stationary step.
KEY_FIGURES = ("unit_forks", "forking_trajectories", "displacement")


def summary_metrics(summary: Mapping[str, float | None], tags: Mapping[str, str]) -> dict[str, float]:
    """`summary/<key>` for every summary value but the run's facts, and for every event whose metric ran
    (NaN where not reached or undefined: see the module's docstring)."""
    logged = {f"{SUMMARY}{key}": float(value) if value is not None else math.nan
              for key, value in summary.items() if key not in RUN_FACTS}  # fmt: skip
    for key, tag in EVENT_TAGS.items():
        if tags.get(tag) is not None:
            logged.setdefault(f"{SUMMARY}{key}", math.nan)
    return logged


def fact_params(summary: Mapping[str, float | None]) -> dict[str, str]:
    """The run's counts (`RUN_FACTS`) as params `run.<key>`: whole numbers without a decimal point."""
    params = {}
    for key in sorted(RUN_FACTS & set(summary)):
        value = summary[key]
        if value is not None and math.isfinite(float(value)):
            params[f"{FACTS}{key}"] = f"{int(value)}" if float(value).is_integer() else f"{float(value):g}"
    return params


def log_summary(tracker: MlflowTracker, summary: Mapping[str, float | None],
                tags: Mapping[str, str]) -> None:  # fmt: skip
    """A run's one-value results as `summary/...` metrics and its counts as `run.<key>` params."""
    tracker.log_summary(summary_metrics(summary, tags))
    tracker.log_params(fact_params(summary))


def logged_value(metrics: Mapping[str, float], key: str) -> float:
    """A run's summary value read back from MLflow (runs logged before the namespaces had bare keys);
    NaN for not reached (NOT_FOUND in older runs), absent or undefined."""
    value = metrics.get(f"{SUMMARY}{key}", metrics.get(key, math.nan))
    return math.nan if value == NOT_FOUND and key in EVENT_TAGS else float(value)


def run_params(settings: GardenConfig, groups: list[str], resolved: Mapping[str, str]) -> dict[str, str]:
    """The params of a run: the settings of the groups the task uses (`groups`, every setting with its
    value, defaults included), what garden resolved (device, output folder), and, under Hydra, the group
    choices and the command line's overrides."""
    params = flatten({group: as_plain(getattr(settings, group)) for group in groups})
    params.update({f"resolved.{key}": str(value) for key, value in resolved.items()})
    params.update(hydra_params())
    return params


def hydra_params() -> dict[str, str]:
    """`hydra.choices.<group>` for each config group and `hydra.overrides` (the command line's key=value
    list); nothing outside a Hydra job (a test, a DVC stage)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    choices = {
        f"hydra.choices.{group}": str(choice)
        for group, choice in hydra_cfg.runtime.choices.items()
        if not group.startswith("hydra/")
    }
    return {**choices, "hydra.overrides": " ".join(hydra_cfg.overrides.task) or "(none)"}


def command_line() -> str | None:
    """The job's command, as the user would retype it (None outside a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return " ".join(["python -m garden", *HydraConfig.get().overrides.task])


def log_results(tracker: MlflowTracker, folder: Path, steps, step_series: Mapping[str, np.ndarray],
                evaluation: pd.DataFrame | None, summary: dict[str, float], tags: dict[str, str],
                extra_artifacts=()) -> list[str]:  # fmt: skip
    """Everything a dynamics run records in its (already started) MLflow run, once analysed;
    `step_series` is keyed by logged name (`step_metrics`). Returns the previews its description shows."""
    tracker.log_step_metrics(steps, step_series)
    if evaluation is not None:
        tracker.log_table(evaluation, "step", prefix=EVALUATION)
    for extra in extra_artifacts:
        if Path(extra).is_file():
            tracker.log_artifact(Path(extra), "series")
    return log_files(tracker, folder, summary, tags, KEY_FIGURES)


def log_files(tracker: MlflowTracker, folder: Path, summary: Mapping, tags: Mapping[str, str],
              key_figures: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    """What every task's run records at its end: the summary and its counts, the tags, the folder's
    tables and figures as artifacts, summary.json, and page-sized previews of its `key_figures` for the
    description to show (returned: their artifact paths)."""
    log_summary(tracker, summary, tags)
    tracker.set_tags(tags)
    tracker.log_artifacts(folder / "tables", "tables")
    tracker.log_artifacts(folder / "figures", "figures")
    tracker.log_artifact(folder / "summary.json")
    return tracker.log_previews(folder / "figures", key_figures)


def log_training_history(tracker: MlflowTracker, history: pd.DataFrame | None) -> None:
    """A training log (step, loss, lr) as `train/...` metrics: for a series trained before this run."""
    if history is not None and len(history):
        tracker.log_table(history, "step", prefix="train/")


def _step(value: float | None) -> str:
    return f"step {value:g}"


def headline(summary: Mapping[str, float | None], tags: Mapping[str, str]) -> list[tuple[str, str]]:
    """The run's headline results as (what, value) rows: the terminal's block and the run description."""

    def event(key: str, why: str = " (looked for, not reached)") -> str:
        value = summary.get(key)
        if value is not None and math.isfinite(value):
            return f"at {_step(value)}"
        state = tags.get(EVENT_TAGS[key])
        return f"none{why}" if state == "none" else (state or "not computed")

    rows = [("pooled bifurcation", event("bifurcation_step"))]
    if "final_bimodal_unit_fraction" in summary:
        fraction, count = summary["final_bimodal_unit_fraction"], summary["n_units"]
        share = f"{fraction:.0%} of {count:g} units bimodal at the end"
        rows.append(("unit bifurcation", f"{event('unit_bifurcation_step', '')} ({share})"))
    else:
        rows.append(("unit bifurcation", tags.get("garden.units", "not computed")))
    rows.append(("stationary", event("stationary_step")))
    for name in ("stationary", "unit_bifurcation"):  # the live monitor's, where one watched the training
        declared = summary.get(f"live_{name}_declared_step")
        if declared is not None:
            found = f"declared at {_step(declared)} (from {_step(summary[f'live_{name}_step'])})"
            rows.append((f"{name.replace('_', ' ')}, live", found if declared >= 0 else "not declared"))
    if summary.get("stopped_step") is not None:
        reason = tags.get("garden.stop_reason")
        rows.append(("training stopped", f"at {_step(summary['stopped_step'])}: {reason}"))
    regimes = summary.get("msd_regimes")
    if regimes:
        slopes = " → ".join(f"t^{summary[f'msd_regime{i}_alpha']:.2f}" for i in range(1, int(regimes) + 1))
        breaks = ", ".join(_step(summary[f"msd_break{i}_step"]) for i in range(1, int(regimes)))
        rows.append(("MSD regimes", slopes + (f" (breaks at {breaks})" if breaks else "")))
    if summary.get("alpha") is not None:
        rows.append(("MSD one power law", f"alpha {summary['alpha']:.3f} (r² {summary['alpha_r2']:.2f})"))
    if summary.get("final_perplexity") is not None:
        rows.append(("final perplexity", f"{summary['final_perplexity']:.2f}"))
    return rows


def _reached(summary: Mapping[str, float | None], key: str) -> float | None:
    value = summary.get(key)
    return float(value) if value is not None and math.isfinite(float(value)) else None


def headline_sentence(summary: Mapping[str, float | None], tags: Mapping[str, str]) -> str:
    """The run's result in one sentence: the first line of its description, which MLflow shows before
    "Show more" (the table below it holds the details)."""
    parts = []
    pooled = _reached(summary, "bifurcation_step")
    if pooled is not None:
        parts.append(f"the tensor forks as a whole at {_step(pooled)}")
    elif tags.get(EVENT_TAGS["bifurcation_step"]) == "none":
        parts.append("the tensor does not fork as a whole")
    units = _reached(summary, "unit_bifurcation_step")
    share = summary.get("final_bimodal_unit_fraction")
    bimodal = f" ({share:.0%} of {summary['n_units']:g} bimodal at the end)" if share is not None else ""
    if units is not None:
        parts.append(f"its units fork at {_step(units)}{bimodal}")
    elif tags.get(EVENT_TAGS["unit_bifurcation_step"]) == "none":
        parts.append(f"its units do not fork{bimodal}")
    settled = _reached(summary, "stationary_step")
    if settled is not None:
        parts.append(f"it becomes stationary at {_step(settled)}")
    elif tags.get(EVENT_TAGS["stationary_step"]) == "none":
        parts.append("it does not become stationary")
    if _reached(summary, "final_perplexity") is not None:
        parts.append(f"final perplexity {summary['final_perplexity']:.2f}")
    if not parts:
        return "No event was looked for (metrics without bifurcation or stationary)."
    sentence = "; ".join(parts)
    return sentence[0].upper() + sentence[1:] + "."


def markdown_rows(rows: list[tuple[str, str]]) -> list[str]:
    """(what, value) rows as the lines of a Markdown table: a run description's results."""
    return ["| result | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def aligned_rows(rows: list[tuple[str, str]]) -> str:
    """(what, value) rows as an indented two-column block: what a finished job prints."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def describe(run_name: str, what: str, summary: Mapping, tags: Mapping, output_dir: Path,
             reuse: str | None = None, previews: Previews = None) -> str:  # fmt: skip
    """The run's description (Markdown): its result in a sentence, its key figures, then what it is, its
    headline results, what it reused, the command and its folder."""
    return description(headline_sentence(summary, tags), run_name, what, headline(summary, tags),
                       output_dir, reuse, previews)  # fmt: skip


#: (run id, artifact paths) of the figure previews a description shows.
Previews = tuple[str, list[str]] | None


def description(sentence: str, run_name: str, what: str, rows: list[tuple[str, str]], output_dir: Path,
                reuse: str | None = None, previews: Previews = None) -> str:  # fmt: skip
    """A run description led by its result (`sentence`, in bold) and its key figures: MLflow's run page
    shows only its first lines before "Show more". A figure is an image served by `mlflow ui` itself
    (`get-artifact`, relative to the page, so it works behind a path prefix too)."""
    command = command_line()
    lines = [f"**{sentence}**", ""]
    if previews is not None and previews[1]:
        run_id, paths = previews
        lines += [" ".join(f"![{Path(path).stem}](get-artifact?path={quote(path, safe='')}&run_uuid={run_id})"
                           for path in paths), ""]  # fmt: skip
    lines += [f"{run_name}: {what}.", "", *markdown_rows(rows)]
    lines += ["", *([reuse, ""] if reuse else []), f"Command: `{command}`" if command else "",
              f"Tables and figures: `{output_dir}`"]  # fmt: skip
    return "\n".join(lines)


def log_outcome(run_name: str, summary: dict, tags: dict, output_dir: Path, run_id: str | None,
                tracking_uri: str | None = None, experiment: str | None = None,
                reuse: Reuse | None = None) -> None:  # fmt: skip
    """What a finished job prints: its headline results, what it reused, where they are, and how to open
    them."""
    rows = [*headline(summary, tags), *([("cache", reuse.line())] if reuse is not None else []),
            ("results", f"{output_dir} (tables/, figures/, summary.json)")]  # fmt: skip
    if tracking_uri:
        rows += [("MLflow run", f"{run_id} in experiment {experiment or 'garden'}"),
                 *open_rows(tracking_uri, experiment or "garden", run_id)]  # fmt: skip
    log.info("%s finished:\n%s", run_name, aligned_rows(rows))


#: What `mlflow ui` serves on by default.
UI_ADDRESS = "http://127.0.0.1:5000"


def absolute_store(tracking_uri: str) -> str:
    """A sqlite store's URI with an absolute path: `sqlite:///mlflow.db` opened from another folder would
    be another, empty store, without an error."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not tracking_uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(tracking_uri[len(prefix) :]).resolve())
    return tracking_uri


def run_link(tracking_uri: str, experiment: str, run_id: str | None) -> str | None:
    """The run's page in `mlflow ui`, on MLflow 3's "Model training" view (`workflowType`)."""
    from mlflow.tracking import MlflowClient

    try:
        found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    except Exception:  # a link is a convenience: the run is recorded either way
        return None
    if found is None or run_id is None:
        return None
    return f"{UI_ADDRESS}/#/experiments/{found.experiment_id}/runs/{run_id}?workflowType=machine_learning"


def open_rows(tracking_uri: str, experiment: str, run_id: str | None) -> list[tuple[str, str]]:
    """How to open the run: the command, with the store's absolute path, and the run's own page."""
    store = absolute_store(tracking_uri)
    rows = [("open it", f"mlflow ui --backend-store-uri {store} --workers 1   (or: make ui)")]
    link = run_link(tracking_uri, experiment, run_id)
    if link is not None:
        rows.append(("", f"then {link}"))
    return rows


# --------------------------------------------------------------------------- cached reruns

#: The mark a run's name starts with when it computed nothing (every record came from garden's caches):
#: at the front, where the runs list's narrow name column still shows it.
CACHED_MARK = "(cached) "


@dataclass
class Reuse:
    """What a job took from garden's caches instead of computing it, tagged (`garden.cached`,
    `garden.reuse`). A run that computed nothing, of a job an earlier run computed, is a cached rerun: its
    name is marked (`CACHED_MARK`), it points at that run (`garden.reused_run`) and says so in its
    description, so that the runs list does not show two identical rows."""

    parts: dict[str, tuple[int, int]]  # what ("extracted steps") -> (computed now, in all)
    trained: bool | None = None  # the series trained in this run; False: before; None: not garden's
    reused_run: str | None = field(default=None, init=False)

    @property
    def state(self) -> str:
        """`all` (nothing computed), `part` or `none` (nothing reused)."""
        computed = bool(self.trained) or any(done for done, _ in self.parts.values())
        reused = self.trained is False or any(done < total for done, total in self.parts.values())
        return "none" if not reused else ("part" if computed else "all")

    def reused(self) -> str:
        """What came from the cache: `66 of 66 extracted steps, the series (trained before)`."""
        items = [f"{total - done} of {total} {what}"
                 for what, (done, total) in self.parts.items() if done < total]
        return ", ".join(items + (["the series (trained before)"] if self.trained is False else []))

    def computed(self) -> str:
        """What was computed now: `66 of 66 extracted steps, the series (trained in this run)`."""
        items = [f"{done} of {total} {what}" for what, (done, total) in self.parts.items() if done]
        return ", ".join(items + (["the series (trained in this run)"] if self.trained else []))

    def line(self) -> str:
        """What the run reused, in words: its description's and the terminal's line."""
        if self.state == "all" and self.reused_run:
            return (f"cached rerun of run {self.reused_run}: nothing computed; from garden's caches: "
                    f"{self.reused()}")
        if self.state == "all":
            return f"nothing computed; from garden's caches: {self.reused()}"
        if self.state == "part":
            return f"partly cached: from garden's caches: {self.reused()}; computed: {self.computed()}"
        return f"nothing reused: computed {self.computed() or 'everything'}"

    def note(self) -> str | None:
        """The description's line: `line()` where anything was reused, else nothing."""
        return self.line() if self.state != "none" else None

    def tags(self) -> dict[str, str]:
        tags = {"garden.cached": self.state, "garden.reuse": self.reused() or "nothing"}
        if self.reused_run:
            tags["garden.reused_run"] = self.reused_run
        return tags

    def name(self, run_name: str) -> str:
        """The name a rerun shows: marked where it would otherwise repeat the name of the run it reused
        (the jobs of a sweep that share one extraction keep their own names)."""
        return CACHED_MARK + run_name if self.state == "all" and self.reused_run else run_name


def computed_by(tracker: MlflowTracker, tags: Mapping[str, str]) -> str | None:
    """The latest earlier finished run of the same job (`garden.job`) on the same series, with the same
    cache versions, that was not itself a cached rerun: the run whose records a cached rerun reused (None
    when they were made elsewhere: another experiment, a DVC stage, a scan)."""
    job, series = tags.get("garden.job"), tags.get("garden.series")
    if not job or not series or "'" in job + series:
        return None
    run = tracker.client.get_run(tracker.run_id)
    caches = {k: v for k, v in tags.items() if k.startswith("garden.cache.")}
    same_job = f"tags.`garden.job` = '{job}' and tags.`garden.series` = '{series}'"
    finished = f"{same_job} and attributes.status = 'FINISHED'"
    found = tracker.client.search_runs([run.info.experiment_id], finished,
                                       order_by=["attributes.start_time DESC"], max_results=50)
    for earlier in found:
        theirs = earlier.data.tags
        if (earlier.info.run_id != run.info.run_id and theirs.get("garden.cached") != "all"
                and all(theirs.get(k) == v for k, v in caches.items())):  # fmt: skip
            return earlier.info.run_id
    return None


def record_reuse(tracker: MlflowTracker, run_name: str, reuse: Reuse, tags: Mapping[str, str]) -> str:
    """Tag the open run with what it reused and, for a cached rerun, the run that computed its records,
    and mark its name; returns the name it shows."""
    if reuse.state == "all":
        reuse.reused_run = computed_by(tracker, tags)
    shown = reuse.name(run_name)
    tracker.set_tags({**reuse.tags(), **({"mlflow.runName": shown} if shown != run_name else {})})
    return shown
