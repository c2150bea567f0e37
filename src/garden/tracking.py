"""The one MLflow tracker: a run per job, flattened params, per-step metrics, summaries, figures, tables.

A run that raises is ended as FAILED (MLflow's `start_run` context does that), so nothing half-done is
ever recorded as FINISHED; an interrupted one (Ctrl-C, or SIGTERM as sent by `kill`, `timeout` and SLURM)
is ended as KILLED. A process killed outright (`kill -9`, the OOM killer) cannot end its run, so every run
carries its host and process: the next run on the store (or `python -m garden.runs cleanup`) ends the
runs whose process is gone as KILLED. A sweep's parent run ends FINISHED, or FAILED when a job failed.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig, OmegaConf

# MLflow takes about a second to import: each function imports it where it is used, so that jobs and DVC
# stages which log nothing do not pay for it.
if TYPE_CHECKING:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch request
PREVIEWS = "previews"
PREVIEW_WIDTH = 560  # pixels: readable, and narrower than the description's column on a laptop
#: Progress kinds that time a pass rather than measure the training: logged as MLflow system metrics.
PROGRESS_KINDS = frozenset({"extract"})

log = logging.getLogger("garden")


def flatten(config: Mapping | DictConfig, prefix: str = "") -> dict[str, str]:
    """Dotted keys to string values, as MLflow params (lists kept as their YAML-ish text)."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def send_metrics(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    """Metrics to a run, in batches of at most MAX_BATCH (the REST API's limit per request)."""
    for start in range(0, len(metrics), MAX_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + MAX_BATCH])


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of the experiment `name`, created when the store has none."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def live_key(kind: str, name: str) -> str:
    """The logged name of a progress report's value: `system/extract_seconds`, `train/loss`."""
    return f"system/{kind}_{name}" if kind in PROGRESS_KINDS else f"{kind}/{name}"


class MlflowTracker:
    def __init__(self, uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id: str | None = None
        #: (key, step) pairs logged live (the tiny training's monitor): the record does not log them again.
        self.logged_live: set[tuple[str, int]] = set()

    @contextmanager
    def start(self, run_name: str, tags: Mapping[str, str] | None = None,
              parent_run_id: str | None = None) -> Iterator[MlflowTracker]:  # fmt: skip
        """A run, made the child of `parent_run_id`, else of the sweep's parent run inside a Hydra
        multirun. Interrupted (SIGINT, or SIGTERM, which raises `Terminated` while the run is open), it
        ends KILLED."""
        with _restored_env("MLFLOW_TRACKING_URI"), self._open(run_name, tags, parent_run_id) as tracker:
            yield tracker

    @contextmanager
    def _open(self, run_name: str, tags: Mapping[str, str] | None,
              parent_run_id: str | None) -> Iterator[MlflowTracker]:  # fmt: skip
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        experiment = mlflow.set_experiment(self.experiment)
        end_dead_runs(self.client, [experiment.experiment_id])
        tags = {**(tags or {}), **process_tags()}
        parent = parent_run_id or sweep_parent_run_id()
        if parent:
            tags["mlflow.parentRunId"] = parent
        with terminate_as_interrupt(), mlflow.start_run(run_name=run_name, tags=tags) as run:
            self.run_id = run.info.run_id
            try:
                yield self
            except KeyboardInterrupt:
                mlflow.end_run("KILLED")
                raise

    @contextmanager
    def parent(self, run_name: str, tags: Mapping[str, str] | None = None) -> Iterator[str]:
        """A run that this process's own runs nest under while it stays open (MLflow's fluent API holds one
        active run per thread, so this one is made and logged with the client: `log_to`). It ends
        FINISHED, FAILED when the block raises, KILLED when interrupted."""
        experiment = experiment_id(self.client, self.experiment)
        end_dead_runs(self.client, [experiment])
        run = self.client.create_run(experiment, run_name=run_name, tags={**(tags or {}), **process_tags()})
        status = "FAILED"
        try:
            with terminate_as_interrupt():
                yield run.info.run_id
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.client.set_terminated(run.info.run_id, status)

    def log_to(self, run_id: str, summary: Mapping[str, float] = {}, params: Mapping[str, str] = {},
               tags: Mapping[str, str] = {}, artifacts: Mapping[str, Path] = {}) -> None:  # fmt: skip
        """Scalars, params, tags and folders (artifact path -> folder) into a run by id (a `parent`)."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()],
            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )
        for artifact_path, folder in artifacts.items():
            if Path(folder).is_dir():
                self.client.log_artifacts(run_id, str(folder), artifact_path)

    def log_params(self, params: Mapping[str, str]) -> None:
        import mlflow

        mlflow.log_params({k: v[:6000] for k, v in params.items()})

    def log_step_metrics(self, steps: np.ndarray, series: Mapping[str, np.ndarray]) -> None:
        """One value per (metric, training step); NaN and inf are skipped, not logged as gaps."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key=name, value=float(v), timestamp=now, step=int(step))
            for name, values in series.items()
            for step, v in zip(steps, values, strict=True)
            if v is not None and math.isfinite(float(v)) and (name, int(step)) not in self.logged_live
        ]
        self._send(batch)

    def _send(self, metrics: list[Metric]) -> None:
        send_metrics(self.client, self.run_id, metrics)

    def log_table(self, table, step_column: str, prefix: str = "") -> None:
        """Every other column of a per-step table as a metric `<prefix><column>` at the step in
        `step_column`."""
        columns = {f"{prefix}{c}": table[c].to_numpy(dtype=float) for c in table.columns if c != step_column}
        self.log_step_metrics(table[step_column].to_numpy(), columns)

    def log_summary(self, values: Mapping[str, float]) -> None:
        """Scalars as they are: NaN included (MLflow stores it), so a key is present even when undefined."""
        import mlflow

        if values:
            mlflow.log_metrics({k: float(v) for k, v in values.items()})

    def log_previews(self, folder: Path, names: tuple[str, ...], width: int = PREVIEW_WIDTH) -> list[str]:
        """Copies of the figures `<name>.png` under `folder` scaled down to `width` pixels, logged as
        `previews/<name>.png` for the run's description to show (MLflow's Markdown keeps an image at its
        own size: a figure as saved is wider than the page). Returns the artifact paths logged."""
        import tempfile

        import mlflow
        from PIL import Image

        found = [Path(folder) / f"{name}.png" for name in names if (Path(folder) / f"{name}.png").is_file()]
        if not found:
            return []
        with tempfile.TemporaryDirectory() as scratch:
            for path in found:
                with Image.open(path) as image:
                    scale = min(1.0, width / image.width)  # never enlarged
                    size = (round(image.width * scale), round(image.height * scale))
                    image.resize(size, Image.Resampling.LANCZOS).save(Path(scratch) / path.name)
            mlflow.log_artifacts(scratch, artifact_path=PREVIEWS)
        return [f"{PREVIEWS}/{path.name}" for path in found]

    @contextmanager
    def live(self, flush_seconds: float = 2.0) -> Iterator[set[str]]:
        """While open, every progress report (`garden.progress`) is logged at its step, in batches every
        `flush_seconds`, so the run's charts grow as training and extraction go: a training's values as
        `<kind>/<name>` against the training step, a pass's progress (`PROGRESS_KINDS`) as
        `system/<kind>_<name>`, which MLflow draws against wall-clock time in the "System metrics" tab.
        Yields the set of kinds reported so far."""
        from mlflow.entities import Metric

        from garden import progress

        pending: list[Metric] = []
        kinds: set[str] = set()
        last_flush = [time.monotonic()]

        def flush() -> None:
            batch, pending[:] = pending[:], []
            self._send(batch)
            last_flush[0] = time.monotonic()

        def listen(kind: str, step: int, values: dict[str, float]) -> None:
            kinds.add(kind)
            now = int(time.time() * 1000)
            keys = {name: live_key(kind, name) for name in values}
            pending.extend(Metric(keys[name], float(value), now, int(step))
                           for name, value in values.items() if math.isfinite(float(value)))  # fmt: skip
            self.logged_live.update((key, int(step)) for key in keys.values())
            if time.monotonic() - last_flush[0] >= flush_seconds:
                flush()

        try:
            with progress.listening(listen):
                yield kinds
        finally:
            flush()

    def set_description(self, text: str) -> None:
        """The run's description (MLflow's note, shown on the run page and as the runs table's tooltip)."""
        import mlflow

        mlflow.set_tag("mlflow.note.content", text)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        mlflow.set_tags(dict(tags))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        """Everything under `folder` (nothing when there is no such folder: figures=false)."""
        import mlflow

        if Path(folder).is_dir():
            mlflow.log_artifacts(str(folder), artifact_path=artifact_path)


@contextmanager
def _restored_env(name: str) -> Iterator[None]:
    """`mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI; put it back once the run is over, so
    it leaks neither into later jobs of the same process (`${oc.env:...}` in conf/) nor their children."""
    before = os.environ.get(name)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


# --------------------------------------------------------------------------- runs whose process died


def _process_start(pid: int) -> str:
    """The kernel's start time of a process (Linux /proc), so a reused pid is not taken for the run's."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_tags() -> dict[str, str]:
    """Who is writing the run: host, pid and the process's start time."""
    return {
        "garden.host": socket.gethostname(),
        "garden.pid": str(os.getpid()),
        "garden.process_start": _process_start(os.getpid()),
    }


def process_alive(tags: Mapping[str, str]) -> bool | None:
    """Whether the process that writes a run still runs; None when that cannot be told from here (another
    host, or a run not started by garden)."""
    if tags.get("garden.host") != socket.gethostname() or not tags.get("garden.pid", "").isdigit():
        return None
    pid = int(tags["garden.pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    started = tags.get("garden.process_start")
    return not started or _process_start(pid) == started


def end_dead_runs(client: MlflowClient, experiment_ids: list[str]) -> list[str]:
    """End as KILLED every RUNNING run of these experiments whose process (on this host) is gone."""
    ended = []
    for run in client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=5000):
        if process_alive(run.data.tags) is False:
            client.set_tag(run.info.run_id, "garden.end_reason", "its process died without ending it")
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    if ended:
        log.warning("ended %d run(s) left RUNNING by a process that died (e.g. kill -9) as KILLED: %s",
                    len(ended), ", ".join(ended))  # fmt: skip
    return ended


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` and interruption path runs."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While open, SIGTERM raises `Terminated` in the main thread (elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


PARENT_RUN_FILE = "mlflow_parent_run_id"
SWEPT_KEYS_FILE = "garden_swept_keys"


def _sweep_dir() -> Path | None:
    """Inside a Hydra multirun job: its sweep's folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir)


def _parsed(overrides: list[str]) -> list:
    """Command-line overrides as Hydra parses them (`+key=`, `~key`, sweeps, quoting)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def swept_keys(overrides: list[str]) -> list[str]:
    """The keys a sweep's command line varies (`seed=0,1`, `lr=range(...)`, `x=choice(...)`)."""
    return [o.key_or_group for o in _parsed(overrides) if o.is_sweep_override()]


def with_swept_overrides(name: str, in_name: tuple[str, ...] = ("model", "variant", "layer")) -> str:
    """A sweep job's run name followed by its values of the swept keys the name does not already say
    (`tiny/standard/unembedding seed=1`): the jobs of a sweep over any key get names that differ. Outside
    a sweep the name is unchanged (the overrides are the run's `hydra.overrides` param)."""
    from hydra.core.hydra_config import HydraConfig

    folder = _sweep_dir()
    marker = folder / SWEPT_KEYS_FILE if folder is not None else None
    if marker is None or not marker.is_file():
        return name
    swept = set(marker.read_text().split()) - set(in_name)
    overrides = _parsed(list(HydraConfig.get().overrides.task))
    chosen = [o.input_line for o in overrides if o.key_or_group in swept]
    return " ".join([name, *chosen])


def sweep_parent_run_id() -> str | None:
    """Inside a Hydra multirun job: the MLflow parent run its sweep opened (read from the sweep folder, so
    jobs in other processes or on other machines of a shared file system find it too)."""
    folder = _sweep_dir()
    marker = folder / PARENT_RUN_FILE if folder is not None else None
    return marker.read_text().strip() if marker is not None and marker.is_file() else None


#: The sweep parent run this process opened and has not ended: (tracking uri, run id).
_open_sweep: tuple[str, str] | None = None


def end_open_sweep(error: BaseException | None) -> None:
    """End the sweep parent this process opened: FAILED when the sweep raised (a job failed), KILLED when
    it was interrupted. Called by the CLI around Hydra, since Hydra skips `on_multirun_end` on failure."""
    from mlflow.tracking import MlflowClient

    global _open_sweep
    if _open_sweep is None:
        return
    uri, run_id = _open_sweep
    _open_sweep = None
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    try:
        MlflowClient(tracking_uri=uri).set_terminated(run_id, status)
    except Exception as err:  # the store itself may be what failed; the next run ends it then
        log.warning("could not end the sweep's parent run %s as %s: %s", run_id, status, err)


class MlflowSweepCallback:
    """Hydra callback: one MLflow parent run per sweep (`-m`); each job's run is its child."""

    def on_multirun_start(self, config, **kwargs) -> None:
        from mlflow.tracking import MlflowClient

        global _open_sweep
        from garden.validation import check_tracking_store

        check_tracking_store(str(config.tracking.uri))
        client = MlflowClient(tracking_uri=str(config.tracking.uri))
        experiment = experiment_id(client, str(config.tracking.experiment))
        end_dead_runs(client, [experiment])
        overrides = " ".join(config.hydra.overrides.task)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        run = client.create_run(
            experiment,
            run_name=f"sweep/{sweep_dir.name}",
            tags={
                "garden.sweep": "parent",
                "garden.sweep_overrides": overrides,
                "garden.sweep_dir": str(sweep_dir),
                **process_tags(),
            },
        )
        _open_sweep = (str(config.tracking.uri), run.info.run_id)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEPT_KEYS_FILE).write_text(" ".join(swept_keys(list(config.hydra.overrides.task))))
        (sweep_dir / PARENT_RUN_FILE).write_text(run.info.run_id)

    def on_multirun_end(self, config, **kwargs) -> None:
        from mlflow.tracking import MlflowClient

        global _open_sweep
        marker = Path(str(config.hydra.sweep.dir)) / PARENT_RUN_FILE
        if marker.is_file():
            MlflowClient(tracking_uri=str(config.tracking.uri)).set_terminated(
                marker.read_text().strip(), "FINISHED"
            )
        _open_sweep = None

    # The other Hydra callback hooks are not needed.
    def on_run_start(self, config, **kwargs) -> None:
        pass

    def on_run_end(self, config, **kwargs) -> None:
        pass

    def on_job_start(self, config, **kwargs) -> None:
        pass

    def on_job_end(self, config, job_return, **kwargs) -> None:
        pass
