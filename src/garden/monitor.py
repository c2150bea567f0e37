"""Watch a training live: the offline pass's statistics of the watched weights every few optimizer
steps, causal events (stationary, unit bifurcation), MLflow logging under the offline keys, and a stop.

`WeightMonitor(model, layers=("unembedding",), every=20)` resolves the roles through the families
registry (the family from `model.config.model_type`), and `observe(step)` runs the pass's own kernel
(`garden.extract.kernel`: fused moments, distances, fine histogram, per-unit sums and dips) on the
weights where they live, against a snapshot of the first observed step (the MSD's reference) and of the
previous observation (the step displacement). It keeps those two snapshots per watched tensor and nothing
else of the weights. At checkpoint steps its numbers are the offline pass's (tested against
`python -m garden model=local` on the same checkpoints).

Events are declared from the past only. Offline, the stationary step is the first checkpoint from which
D / max(D) stays below the threshold *through the end* and the unit bifurcation the first from which the
bimodal-unit fraction stays above its threshold through the end: both look at the future. Live:

- stationary: D / (largest D so far) < `stationary_threshold` at `patience` consecutive observations
  from `min_step` on; declared at the last of them, dated from the first;
- unit bifurcation: bimodal-unit fraction >= `unit_fraction_threshold` at `patience` consecutive
  observations from `min_step` on.

`summary()` gives both: the live events (when declared, from when) and the offline definitions applied to
the observed history once the training ends.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from garden.devices import pass_threads
from garden.errors import GardenError
from garden.extract.kernel import (
    UnitLayout,
    Workspace,
    histogram_quantiles,
    pass_blocks,
    step_statistics,
    unit_dips,
    with_dips,
)
from garden.extract.plan import ExtractionPlan
from garden.extract.records import quantile_column
from garden.families import BLOCK_ROLES, ROLES, Family, TensorSpec, detect
from garden.metrics.diffusion import relative_displacement
from garden.metrics.events import onset_index, stationary_onset
from garden.metrics.units import unit_step_series
from garden.settings import read_section
from garden.settings.declare import STOP_RULES
from garden.settings.models import MonitorSettings
from garden.tracking import send_metrics
from garden.trajectory import sarle_bimodality

log = logging.getLogger("garden")

SUPPORTED = (
    "the monitor reads each watched weight whole: supported are one process and DDP (replicated weights, "
    "rank 0 computes); sharded parameters (FSDP, DeepSpeed ZeRO-3, DTensor) and meta or empty ones are not"
)


@dataclass
class LiveEvent:
    """An event declared during training: the step it was declared at and the step it dates from."""

    name: str
    tensor: str
    declared_step: int
    from_step: int


@dataclass
class _Streak:
    """Consecutive observations at which an event's condition held (from `min_step` on)."""

    length: int = 0
    first: int | None = None

    def update(self, holds: bool, step: int) -> None:
        if holds:
            self.first = step if self.length == 0 else self.first
            self.length += 1
        else:
            self.length, self.first = 0, None


@dataclass
class _History:
    """The scalar series of one watched tensor, one entry per observation (for the offline definitions
    at the end, and for resuming)."""

    steps: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, step: int, values: Mapping[str, float]) -> None:
        self.steps.append(step)
        for key, value in values.items():
            self.values.setdefault(key, []).append(float(value))


class _Watched:
    """One watched tensor: its parameters, its plan (the pass's settings), its two snapshots, its history
    and its live events' streaks."""

    def __init__(
        self, label: str, spec: TensorSpec, parameters: list[torch.Tensor], settings: MonitorSettings
    ):
        self.label, self.spec, self.parameters = label, spec, parameters
        self.plan = ExtractionPlan(
            tensor=spec.name,
            steps=(0,),
            reference_step=0,
            subsample=None,
            quantile_bins=settings.quantile_bins,
            quantiles=tuple(settings.quantiles),
            chunk_size=settings.chunk_size,
            seed=settings.seed,
            unit_axis=settings.unit_axis,
            unit_sample=settings.unit_sample,
        )
        shape = tuple(self.current().shape)
        axis = self.plan.resolve_unit_axis(shape)
        self.units = None if axis is None else UnitLayout(shape, axis, settings.unit_sample, settings.seed)
        self.reference: torch.Tensor | None = None
        self.previous: torch.Tensor | None = None
        self.previous_step: int | None = None
        self.peak_displacement = -math.inf
        self.history = _History()
        self.streaks = {name: _Streak() for name in STOP_RULES}
        self.events: dict[str, LiveEvent] = {}

    def current(self) -> torch.Tensor:
        """The tensor as the checkpoints store it (derived roles computed from their parts)."""
        parts = [p.detach() for p in self.parameters]
        return parts[0] if self.spec.derive is None else self.spec.derive(parts)

    @property
    def nbytes(self) -> int:
        """What the two snapshots hold."""
        return sum(t.numel() * t.element_size() for t in (self.reference, self.previous) if t is not None)

    def statistics(self, step: int, settings: MonitorSettings) -> dict[str, float]:
        """The offline record's numbers at this step, under the offline run's keys."""
        x = self.current()
        if self.reference is None:
            self.reference = x.clone()
        low, high = torch.aminmax(x)
        extent = max(abs(float(low)), abs(float(high)))
        if not math.isfinite(extent):
            raise GardenError(f"step {step}: {self.spec.name} holds non-finite values (NaN or inf)")
        half = 1.25 * extent if extent > 0 else 1.0  # the pass's rule, on the step's own extremes
        width = pass_blocks(tuple(x.shape), self.plan.chunk_size, self.units)[1]
        workspace = Workspace(width, self.plan.quantile_bins, x.device)  # on the weights' device
        try:
            with pass_threads(x.device):  # the offline pass's thread count, so its sums' order
                stats = step_statistics(x, self.reference, self.previous, -half, half,
                                        self.plan.quantile_bins, self.plan.chunk_size, workspace,
                                        self.units)  # fmt: skip
        finally:
            workspace.close()
        quantiles = histogram_quantiles(stats["fine_hist"], -half, half, self.plan.quantiles, stats["min"],
                                        stats["max"])  # fmt: skip
        gap = step - self.previous_step if self.previous_step is not None else 0
        displacement = stats["step_msd"] / gap if gap > 0 else math.nan
        if math.isfinite(displacement):
            self.peak_displacement = max(self.peak_displacement, displacement)
        relative = displacement / self.peak_displacement if self.peak_displacement > 0 else math.nan
        values = {
            "diffusion/msd": stats["msd"],
            "diffusion/step_msd": stats["step_msd"],
            "diffusion/displacement": displacement,
            "monitor/relative_displacement": relative,
            **{f"dist/{name}": stats[name] for name in ("mean", "std", "rms", "skewness", "min", "max")},
            "dist/excess_kurtosis": stats["kurtosis"],
            **{f"dist/{quantile_column(q)}": v for q, v in zip(self.plan.quantiles, quantiles, strict=True)},
            "bimodality/bimodality_coefficient": float(
                sarle_bimodality(stats["skewness"], stats["kurtosis"], x.numel())
            ),
        }
        if self.units is not None:
            values.update(self._unit_values(x, stats["units"], settings))
        self.previous, self.previous_step = x.clone(), step
        return values

    def _unit_values(self, x: torch.Tensor, unit_stats: dict, settings: MonitorSettings) -> dict[str, float]:
        """The offline unit metric's per-step numbers (`unit_step_series`) of this one step."""
        dips, _ = unit_dips(self.units, x)
        record = with_dips({}, self.units, dips)
        bc = sarle_bimodality(unit_stats["skewness"], unit_stats["kurtosis"], self.units.length)
        series, _ = unit_step_series(record["unit_dip_pvalue"][None], dips[None], bc[None], settings.unit_fdr)
        return {f"units/{key}": float(values[0]) for key, values in series.items()}

    def update_events(
        self, step: int, values: Mapping[str, float], settings: MonitorSettings
    ) -> list[LiveEvent]:
        """The events this observation declares (each at most once)."""
        if step < settings.min_step:
            return []
        relative = values["monitor/relative_displacement"]
        fraction = values.get("units/bimodal_unit_fraction")
        conditions = {
            "stationary": math.isfinite(relative) and relative < settings.stationary_threshold,
            "unit_bifurcation": fraction is not None and fraction >= settings.unit_fraction_threshold,
        }
        declared = []
        for name, holds in conditions.items():
            streak = self.streaks[name]
            streak.update(holds, step)
            if name not in self.events and streak.length >= settings.patience:
                self.events[name] = LiveEvent(name, self.label, step, int(streak.first))
                declared.append(self.events[name])
        return declared

    def offline_events(self, settings: MonitorSettings) -> dict[str, float | None]:
        """The offline definitions (through the end of what was observed) on the observed history."""
        steps = np.asarray(self.history.steps)
        rate = np.asarray(self.history.values.get("diffusion/displacement", []), dtype=float)
        relative = relative_displacement(rate)
        out = {"stationary_step": stationary_onset(steps, relative, settings.stationary_threshold)}
        fraction = self.history.values.get("units/bimodal_unit_fraction")
        if fraction is not None:
            index = onset_index(np.asarray(fraction) >= settings.unit_fraction_threshold)
            out["unit_bifurcation_step"] = None if index is None else float(steps[index])
        return out

    def state(self) -> dict:
        return {
            "reference": None if self.reference is None else self.reference.cpu(),
            "previous": None if self.previous is None else self.previous.cpu(),
            "previous_step": self.previous_step,
            "peak_displacement": self.peak_displacement,
            "history": {"steps": list(self.history.steps), "values": dict(self.history.values)},
            "streaks": {name: asdict(s) for name, s in self.streaks.items()},
            "events": {name: asdict(e) for name, e in self.events.items()},
        }

    def load(self, state: Mapping) -> None:
        device = self.parameters[0].device
        self.reference = None if state["reference"] is None else state["reference"].to(device)
        self.previous = None if state["previous"] is None else state["previous"].to(device)
        self.previous_step = state["previous_step"]
        self.peak_displacement = float(state["peak_displacement"])
        self.history = _History(list(state["history"]["steps"]),
                                {k: list(v) for k, v in state["history"]["values"].items()})  # fmt: skip
        self.streaks = {name: _Streak(**s) for name, s in state["streaks"].items()}
        self.events = {name: LiveEvent(**e) for name, e in state["events"].items()}


# ------------------------------------------------------------------------------ resolving the roles


def model_config(model: torch.nn.Module) -> dict:
    """The Hugging Face config of the model, or of the first submodule that has one (a LightningModule
    wrapping a transformers model); {} when none."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            return config.to_dict()
    return {}


def _parameter(model: torch.nn.Module, stored: str, named: Mapping[str, torch.Tensor], role: str | None):
    """The parameter a checkpoint stores as `stored`: by name (wrappers may prefix it: `module.`,
    `model.`), else for the (un)embedding the model's own accessor (transformers 5 names Pythia's stored
    `embed_out` `lm_head` in memory)."""
    matches = [n for n in named if n == stored or n.endswith("." + stored)]
    if len(matches) == 1:
        return matches[0], named[matches[0]]
    accessor = {"unembedding": "get_output_embeddings", "embedding": "get_input_embeddings"}.get(role or "")
    for module in model.modules():
        get = getattr(module, accessor, None) if accessor else None
        found = get() if callable(get) else None
        weight = getattr(found, "weight", None)
        if isinstance(weight, torch.Tensor):
            name = next((n for n, p in named.items() if p is weight), stored)
            return name, weight
    return None, None


def _split_role(layer: str) -> tuple[str, int | None] | None:
    """`unembedding` -> (unembedding, None), `mlp_out.3` -> (mlp_out, 3); None when not a role."""
    role, _, index = layer.partition(".")
    if role not in ROLES:
        return None
    if role in BLOCK_ROLES:
        if not index.lstrip("-").isdigit():
            raise GardenError(
                f"monitor layer {layer!r}: {role} is a block role; write {role}.<block>, e.g. {role}.0"
            )
        return role, int(index)
    return (role, None) if not index else None


def resolve_watched(
    model: torch.nn.Module, settings: MonitorSettings, family: Family | None
) -> list[_Watched]:
    """Each layer as a role of the model's family or an exact parameter name, its parameters checked."""
    named = dict(model.named_parameters())
    config = model_config(model)
    family = family or detect(config, lambda: named)
    blocks = config.get("num_hidden_layers")
    watched = []
    for layer in settings.layers:
        parsed = _split_role(layer)
        if parsed is None:
            if layer not in named:
                raise GardenError(f"monitor layer {layer!r} is neither a role ({', '.join(ROLES)}) nor a "
                                  f"parameter of the model; its parameters: {_sample(named)}")  # fmt: skip
            spec, role = TensorSpec.stored(layer), None
        else:
            role, index = parsed
            if family is None:
                raise GardenError(f"monitor layer {layer!r} is a role, but the model's family is unknown "
                                  f"(config.model_type {config.get('model_type')!r}); pass family=, or "
                                  "name parameters exactly")  # fmt: skip
            if index is not None and blocks is not None and not -blocks <= index < blocks:
                raise GardenError(f"monitor layer {layer!r}: the model has {blocks} blocks; valid "
                                  f"{role}.0..{role}.{blocks - 1}")  # fmt: skip
            index = None if index is None else index % blocks if blocks else index
            spec = family.tensor(role, index, config)
        parameters = []
        for part in spec.parts:
            name, parameter = _parameter(model, part, named, role)
            if parameter is None:
                have = sorted(r for r in ROLES if _has_role(model, family, r, named, config))
                raise GardenError(
                    f"monitor layer {layer!r}: the model has no parameter {part!r}; the roles it has: "
                    f"{', '.join(have) or 'none'} (or name one of: {_sample(named)})"
                )
            check_parameter(name, parameter)
            parameters.append(parameter)
        watched.append(_Watched(layer, spec, parameters, settings))
    return watched


def _has_role(model, family: Family | None, role: str, named, config: dict) -> bool:
    if family is None:
        return False
    try:
        spec = family.tensor(role, 0 if role in BLOCK_ROLES else None, config)
    except GardenError:
        return False
    return all(_parameter(model, part, named, role)[1] is not None for part in spec.parts)


def _sample(named: Mapping[str, torch.Tensor], count: int = 6) -> str:
    names = list(named)
    return ", ".join(names[:count]) + (f", ... ({len(names)} in all)" if len(names) > count else "")


def check_parameter(name: str, parameter: torch.Tensor) -> None:
    """A parameter the monitor can read whole on this rank, else an error naming it."""
    why = None
    if parameter.is_meta:
        why = "is on the meta device (not materialised)"
    elif type(parameter).__name__ in ("DTensor", "FlatParameter") or hasattr(parameter, "ds_id"):
        kind = "DeepSpeed ZeRO-3" if hasattr(parameter, "ds_id") else type(parameter).__name__
        why = f"is sharded ({kind})"
    elif (
        isinstance(getattr(parameter, "data", None), torch.Tensor)
        and type(parameter.data).__name__ == "DTensor"
    ):
        why = "is sharded (DTensor)"
    elif parameter.numel() == 0:
        why = "is empty (a sharded parameter's local stub, e.g. FSDP or DeepSpeed ZeRO-3)"
    if why is not None:
        raise GardenError(f"parameter {name!r} {why}; {SUPPORTED}")


# ------------------------------------------------------------------------------------------ logging


class MlflowSink:
    """The monitor's metrics to an MLflow run, sent by a background thread (one batch per observation),
    so the training loop never waits on the tracking server. The run is the active one when the first
    observation is logged, else one the monitor opens (and ends at `close`)."""

    def __init__(self, run_name: str = "garden-monitor", run_id: str | None = None,
                 tracking_uri: str | None = None):  # fmt: skip
        self.run_name, self.tracking_uri = run_name, tracking_uri
        self.run_id: str | None = run_id  # given: a run a trainer's logger opened (Lightning's MLFlowLogger)
        self.opened = False
        self.client = None
        self.sender = ThreadPoolExecutor(1, thread_name_prefix="garden-monitor-log")
        self.pending: list[Future] = []

    def _ensure_run(self) -> None:
        if self.client is not None:
            return
        import mlflow

        if self.run_id is not None:
            self.client = mlflow.tracking.MlflowClient(tracking_uri=self.tracking_uri)
            return
        run = mlflow.active_run()
        if run is None:
            run = mlflow.start_run(run_name=self.run_name)
            self.opened = True
        self.run_id = run.info.run_id
        self.client = mlflow.tracking.MlflowClient()

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        self._ensure_run()
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in values.items() if math.isfinite(float(v))]
        self.pending = [f for f in self.pending if not f.done()]
        self.pending.append(self.sender.submit(send_metrics, self.client, self.run_id, batch))

    def tags(self, tags: Mapping[str, str]) -> None:
        self._ensure_run()
        self.flush()
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def flush(self) -> None:
        for future in self.pending:
            future.result()
        self.pending = []

    def close(self, status: str = "FINISHED") -> None:
        self.flush()
        self.sender.shutdown(wait=True)
        if self.opened:
            import mlflow

            if mlflow.active_run() is not None and mlflow.active_run().info.run_id == self.run_id:
                mlflow.end_run(status)
            self.opened = False


class ProgressSink:
    """The monitor's metrics as `garden.progress` reports (`diffusion/msd` is kind `diffusion`, name `msd`):
    garden's own trainer uses it, and the job's MLflow run logs whatever is reported while it trains.
    `prefix` (e.g. `live/`) keeps them apart from the offline record's keys where they are not its numbers
    (observations between the checkpoints)."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        from garden.progress import report

        kinds: dict[str, dict[str, float]] = {}
        for key, value in values.items():
            kind, _, name = (self.prefix + key).partition("/")
            kinds.setdefault(kind, {})[name] = value
        for kind, named in kinds.items():
            report(kind, step, named)

    def tags(self, tags: Mapping[str, str]) -> None:
        """Tags are the job's to set (from the series' completion marker)."""

    def close(self, status: str = "FINISHED") -> None:
        """Nothing to end: the job owns its run."""


# ------------------------------------------------------------------------------------------ the monitor


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_logging_rank() -> bool:
    """Rank 0 of a distributed run (or a run that is not distributed): weights are replicated under DDP,
    so one rank computes and logs."""
    return not _distributed() or torch.distributed.get_rank() == 0


class WeightMonitor:
    """The offline pass's statistics of a training's weights, live; see the module's docstring.

    Call `observe(step)` after an optimizer step (`due(step)` says whether `every` asks for one), or use
    a trainer callback (`garden.integrations.transformers` / `.lightning`). `should_stop` turns true when
    `stop_on`'s event is declared for every watched tensor.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: Iterable[str] = ("unembedding",),
        every: int = 20,
        *,
        family: Family | str | None = None,
        sink: MlflowSink | ProgressSink | None = None,
        **settings,
    ) -> None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        self.settings: MonitorSettings = read_section(
            MonitorSettings, {"layers": layers, "every": every, **settings}, "monitor."
        )
        if isinstance(family, str):
            from garden.families import get

            family = get(family)
        self.model = model
        self.watched = resolve_watched(model, self.settings, family)
        self.rank0 = _is_logging_rank()
        self.sink = sink if sink is not None else (MlflowSink() if self.settings.log and self.rank0 else None)
        self.seconds = 0.0
        self.observations = 0
        self.events: list[LiveEvent] = []
        self.should_stop = False
        self.stop_reason: str | None = None
        self.stopped_step: int | None = None
        self.last_step: int | None = None

    # ------------------------------------------------------------------ observing

    def due(self, step: int) -> bool:
        """Whether `every` asks for an observation at this optimizer step (step 0, then every `every`)."""
        return step % self.settings.every == 0 and step != self.last_step

    @torch.no_grad()
    def observe(self, step: int) -> dict[str, dict[str, float]]:
        """The watched tensors' statistics at this optimizer step ({label: {key: value}}), logged, and the
        events it declares; under DDP only rank 0 computes (the stop is shared with every rank)."""
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            raise GardenError(f"monitor.observe({step}): steps must increase (the last was {self.last_step})")
        self.last_step = step
        found: dict[str, dict[str, float]] = {}
        if self.rank0:
            began = time.perf_counter()
            declared = []
            for watched in self.watched:
                values = watched.statistics(step, self.settings)
                watched.history.add(step, values)
                declared += watched.update_events(step, values, self.settings)
                found[watched.label] = values
            self.events += declared
            self._decide_stop(step)
            self.seconds += time.perf_counter() - began
            self.observations += 1
            self._log(step, found, declared)
        self._share_stop()
        return found

    def _decide_stop(self, step: int) -> None:
        rule = self.settings.stop_on
        if rule is None or self.should_stop:
            return
        if all(rule in w.events for w in self.watched):
            self.should_stop, self.stopped_step = True, step
            dates = ", ".join(f"{w.label} from step {w.events[rule].from_step}" for w in self.watched)
            self.stop_reason = f"{rule} declared at step {step} ({dates}; patience {self.settings.patience})"
            log.info("monitor: stopping the training: %s", self.stop_reason)

    def _share_stop(self) -> None:
        """Under DDP every rank stops together: rank 0's decision is broadcast."""
        if not _distributed():
            return
        decision = [self.should_stop, self.stopped_step, self.stop_reason]
        torch.distributed.broadcast_object_list(decision, src=0)
        self.should_stop, self.stopped_step, self.stop_reason = decision

    def _log(self, step: int, found: Mapping[str, Mapping[str, float]], declared: list[LiveEvent]) -> None:
        if self.sink is None:
            return
        prefix = len(self.watched) > 1
        values = {f"{label}/{k}" if prefix else k: v for label, vs in found.items() for k, v in vs.items()}
        values["monitor/seconds"] = self.seconds
        values["monitor/events"] = float(len(self.events))
        self.sink.metrics(step, values)
        for event in declared:
            log.info("monitor: %s of %s declared at step %d (from step %d)", event.name, event.tensor,
                     event.declared_step, event.from_step)  # fmt: skip

    # ------------------------------------------------------------------ the end

    def summary(self) -> dict[str, float]:
        """The live events (declared at, dated from), the offline definitions on the observed history,
        the stop, the monitor's own time and memory; keys prefixed per tensor when several are watched."""
        out: dict[str, float] = {}
        prefix = len(self.watched) > 1
        for watched in self.watched:
            head = f"{watched.label}/" if prefix else ""
            for name in STOP_RULES:
                event = watched.events.get(name)
                out[f"{head}live_{name}_step"] = -1.0 if event is None else float(event.from_step)
                out[f"{head}live_{name}_declared_step"] = (
                    -1.0 if event is None else float(event.declared_step)
                )
            for key, value in watched.offline_events(self.settings).items():
                out[f"{head}{key}"] = -1.0 if value is None else value
        out["monitor_seconds"] = self.seconds
        out["monitor_observations"] = float(self.observations)
        out["monitor_snapshot_bytes"] = float(self.snapshot_bytes)
        if self.stopped_step is not None:
            out["stopped_step"] = float(self.stopped_step)
        return out

    @property
    def snapshot_bytes(self) -> int:
        """The memory the monitor holds between observations: the reference and previous snapshots."""
        return sum(w.nbytes for w in self.watched)

    def close(self, status: str = "FINISHED") -> dict[str, float]:
        """Log the summaries (`summary/...`) and the stop (tag `garden.stop_reason`), and end a run the
        monitor opened. Returns the summary."""
        summary = self.summary()
        if self.sink is not None:
            self.sink.metrics(self.last_step or 0, {f"summary/{k}": v for k, v in summary.items()})
            tags = {f"garden.live.{e.tensor}.{e.name}": f"declared at step {e.declared_step}, from step "
                    f"{e.from_step}" for e in self.events}  # fmt: skip
            if self.stop_reason is not None:
                tags["garden.stop_reason"] = self.stop_reason
            self.sink.tags(tags)
            self.sink.close(status)
        return summary

    # ------------------------------------------------------------------ resuming

    def state_dict(self) -> dict:
        """Everything a resumed training needs to give the same numbers and events (tensors on the CPU)."""
        return {
            "layers": [w.label for w in self.watched],
            "watched": [w.state() for w in self.watched],
            "seconds": self.seconds,
            "observations": self.observations,
            "events": [asdict(e) for e in self.events],
            "stop": [self.should_stop, self.stopped_step, self.stop_reason],
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: Mapping, step: int | None = None) -> None:
        """The state `state_dict` gave; `step` is the optimizer step the training resumes at: where the
        monitor last observed it, the model's weights must be those it saw (a checkpoint not loaded into
        the model is named here, not averaged into the numbers)."""
        labels = [w.label for w in self.watched]
        if list(state["layers"]) != labels:
            raise GardenError(f"the monitor's saved state watches {list(state['layers'])}, this one {labels}")
        for watched, saved in zip(self.watched, state["watched"], strict=True):
            watched.load(saved)
        self.seconds, self.observations = float(state["seconds"]), int(state["observations"])
        self.events = [LiveEvent(**e) for e in state["events"]]
        self.should_stop, self.stopped_step, self.stop_reason = state["stop"]
        self.last_step = state["last_step"]
        for watched in self.watched:
            if step not in (None, self.last_step) or watched.previous is None:
                continue
            if not torch.equal(watched.current(), watched.previous):
                raise GardenError(
                    f"the model resumed at step {self.last_step} does not hold the weights the monitor saw "
                    f"there: {watched.spec.name} differs from its snapshot: the checkpoint was not (fully) "
                    "loaded into the model; load the model from that checkpoint before resuming"
                )
