"""The pass over a plan's steps: each step's record reused from the cache or computed, bad steps excluded
where the series allows it (`series.on_bad_step`), tensors fetched ahead, unit dips run in the
background, progress reported.

Nothing here decides a recorded number (that is `kernel` and `records`), so this module is not part of
the cache's code version.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from garden import cache
from garden.devices import pass_threads
from garden.errors import GardenError
from garden.extract import records
from garden.extract.kernel import UnitLayout, Workspace, pass_blocks, unit_dips, with_dips
from garden.extract.plan import BadStep, ExtractionPlan, check_shape
from garden.extract.records import Basis
from garden.progress import bar as progress_bar
from garden.progress import report as progress_report
from garden.series import CheckpointSeries, Prefetcher
from garden.trajectory import Trajectory

log = logging.getLogger("garden")
Reusable = dict[int, tuple[str, dict]]


def extract(
    series: CheckpointSeries,
    plan: ExtractionPlan,
    cache_dir: Path,
    progress: bool = True,
    device: torch.device | str = "cpu",
    prefetch: int = 0,
) -> Trajectory:
    """Stream the plan's steps through the fused pass, reusing every step already in the cache. The
    cache folder is held by a lock while this job fills it: a second job on it waits, then reuses.
    For a remote series, `prefetch` steps are fetched ahead while a step is computed."""
    folder = Path(cache_dir) / plan.cache_key(series.identity)
    with cache.producing(folder, f"the extraction of {plan.tensor} from {series.identity}"):
        return _extract(
            series, plan, folder, progress, torch.device(device), prefetch if series.remote else 0
        )


def _planned_reads(series: CheckpointSeries, plan: ExtractionPlan, folder: Path, ref_fp: str,
                   keep_records: bool = True) -> tuple[list[int], Reusable]:  # fmt: skip
    """The records the pass can reuse (with the dependency string each was checked against), and the
    tensors it will read, in order, for the rest: what the prefetcher fetches ahead. Without
    `keep_records` (a scan of many tensors) a reusable record is noted, not held. A step's content id
    is read here only where a record may be reused (its own, or its successor's, which names it): a step
    to compute is hashed by the pass from the copy it reads (`fingerprint_of`)."""
    reads: list[int] = []
    reusable: Reusable = {}
    steps = list(plan.steps)
    stored = [records.step_path(folder, step).is_file() for step in steps]
    prev_step, prev_fp, reference_read, prev_in_memory = None, "", False, False
    for i, step in enumerate(steps):
        named = stored[i] or (i + 1 < len(steps) and stored[i + 1])
        fingerprint = series.fingerprint(step, plan.tensor) if named else ""
        record = None
        if stored[i]:
            depends = records.step_depends(fingerprint, ref_fp, prev_step, prev_fp)
            record = records.load_record(records.step_path(folder, step), depends)
        if record is None:
            if not reference_read:
                reads.append(plan.reference_step)
                reference_read = True
            if prev_step is not None and not prev_in_memory:
                reads.append(prev_step)
            reads.append(step)
            prev_in_memory = True
        else:
            reusable[step] = (depends, record if keep_records else {"step": step, "depends": depends})
            prev_in_memory = False
        prev_step, prev_fp = step, fingerprint
    return reads, reusable


def _extract(series: CheckpointSeries, plan: ExtractionPlan, folder: Path, progress: bool,
             device: torch.device, prefetch: int) -> Trajectory:  # fmt: skip
    meta = records.current_meta(series, plan, folder)
    ref_fp = series.fingerprint(plan.reference_step, plan.tensor)
    planned, reusable = _planned_reads(series, plan, folder, ref_fp)
    # One read-ahead queue for the whole job: the meta stage's reads (the reference and the final step)
    # first, then the pass's, so that a remote series is fetching the first steps while the meta is made.
    meta_reads = [] if meta is not None else records.meta_reads(plan)
    reads = Prefetcher(lambda step: series.read_tensor(step, plan.tensor), meta_reads + planned, prefetch)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(reads.close)
        basis = records.open_basis(series, plan, folder, meta, reads.get)
        walk = _Walk(series, plan, folder, basis, reads, ref_fp, reusable, device)
        cleanup.callback(walk.close)
        status = _Progress(series, plan, progress)
        cleanup.callback(status.bar.close)
        cleanup.enter_context(pass_threads(device))
        walk.run(status)
    log.info("extract %s: %d of %d steps computed, %d reused from the cache (%s)", plan.tensor, walk.computed,
             len(walk.records), len(walk.records) - walk.computed, folder)  # fmt: skip
    if series.remote:
        log.info("extract %s: fetched %s", plan.tensor, status.fetch_rate())
    trajectory = records.assemble(walk.records, plan, basis)
    trajectory.meta["excluded_steps"] = {str(step): reason for step, reason in walk.excluded.items()}
    trajectory.computed_steps = walk.computed
    return trajectory


class _Progress:
    """The progress bar, the live progress report and, for a remote series, the fetch rate."""

    def __init__(self, series: CheckpointSeries, plan: ExtractionPlan, progress: bool):
        self.series = series
        self.bar = progress_bar(plan.steps, desc=f"extract {plan.tensor}", unit="step", enabled=progress)
        self.fetched_before, self.started = series.bytes_fetched(), time.perf_counter()

    def step_done(self, step: int, checkpoints_done: int) -> None:
        progress_report("extract", step, {"checkpoints_done": float(checkpoints_done),
                                          "seconds": time.perf_counter() - self.started})  # fmt: skip
        if self.series.remote:
            self.bar.set_postfix_str(self.fetch_rate())

    def fetch_rate(self) -> str:
        """Bytes fetched and the rate since the start, for the progress bar and the log."""
        fetched = self.series.bytes_fetched() - self.fetched_before
        seconds = max(time.perf_counter() - self.started, 1e-9)
        return f"{fetched / 1e6:.1f} MB fetched, {fetched / 1e6 / seconds:.1f} MB/s"


@dataclass
class _Pending:
    """A computed step whose unit dips are still running in the background."""

    record: dict
    path: Path
    units: UnitLayout
    dips: Future
    keep: Callable[[dict], None]


class _DipQueue:
    """Each step's unit dips run in a background thread (`garden.dip`, GIL released) while the next
    checkpoint (or, in a scan, the next tensor) is read and reduced: at most one step waits for them, its
    record saved and kept (`keep`) once they are done."""

    def __init__(self, save: Callable[[Path, dict], None] = records.save_record):
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="garden-dip")
        self.pending: _Pending | None = None
        self.save = save

    def submit(self, record: dict, path: Path, tensor: torch.Tensor, units: UnitLayout,
               keep: Callable[[dict], None]) -> None:  # fmt: skip
        self.pending = _Pending(record, path, units, self.worker.submit(unit_dips, units, tensor), keep)

    def finish(self) -> None:
        """Wait for the pending step's unit dips, complete its record, write it to the cache, keep it."""
        pending, self.pending = self.pending, None
        dips, _ = pending.dips.result()
        record = with_dips(pending.record, pending.units, dips)
        self.save(pending.path, record)
        pending.keep(record)

    def salvage(self) -> None:
        """Interrupted while a step was still in the background: keep its finished work."""
        if self.pending is not None and not self.pending.dips.cancelled():
            with contextlib.suppress(Exception):
                self.finish()

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)


class _Walk:
    """The steps in order, each record reused or computed against the reference and its predecessor (the
    last good step), holding at most three tensors: the reference, the predecessor and the current one."""

    def __init__(self, series: CheckpointSeries, plan: ExtractionPlan, folder: Path, basis: Basis,
                 reads: Prefetcher, ref_fp: str, reusable: Reusable, device: torch.device,
                 workspace: Workspace | None = None, dips: _DipQueue | None = None,
                 keep_records: bool = True,
                 save: Callable[[Path, dict], None] = records.save_record):  # fmt: skip
        """A scan passes one `workspace`, one dip queue and one background `save` to all its tensors'
        walks, and keeps only which steps were kept (`kept`), each record staying on disk
        (`keep_records=False`)."""
        self.series, self.plan, self.folder, self.basis = series, plan, folder, basis
        self.reads, self.ref_fp, self.reusable = reads, ref_fp, reusable
        self._owned: list = []
        if workspace is None:
            workspace = Workspace(walk_width(basis, plan), plan.quantile_bins, device)
            self._owned.append(workspace)
        self.workspace = workspace
        if basis.units is not None and dips is None:
            dips = _DipQueue()
            self._owned.append(dips)
        self.dips = None if basis.units is None else dips
        self.keep_records, self.save = keep_records, save
        self.records: list[dict] = []
        self.kept: list[tuple[int, str]] = []  # (step, depends) of every kept step, in order
        self.computed = 0
        self.excluded: dict[int, str] = {}
        self.reference: torch.Tensor | None = None
        self.prev: torch.Tensor | None = None
        self.prev_step: int | None = None
        self.prev_fp = ""

    def run(self, status: _Progress) -> None:
        try:
            for step in status.bar:
                if self._visit(step):
                    status.step_done(step, len(self.records) + self._waiting())
            self._finish_pending()
        except BaseException:
            if self.dips is not None:
                self.dips.salvage()
            raise

    def close(self) -> None:
        for owned in self._owned:
            owned.close()

    def release(self) -> None:
        """Let go of the reference and the predecessor (read again when a later step is computed): a scan
        holds one tensor's at a time."""
        self.reference = self.prev = None

    def _keep(self, record: dict) -> None:
        if self.keep_records:
            self.records.append(record)
        self.kept.append((int(record["step"]), str(record["depends"])))

    def _visit(self, step: int) -> bool:
        """The step's record, reused or computed; False when the step is excluded."""
        path = records.step_path(self.folder, step)
        known = self.reusable.pop(step, None)
        record, fingerprint = None, ""
        if known is not None or path.is_file():  # a record that may be reused: checked against the content
            fingerprint = self.series.fingerprint(step, self.plan.tensor)
            depends = records.step_depends(fingerprint, self.ref_fp, self.prev_step, self.prev_fp)
            matched = known is not None and known[0] == depends
            record = known[1] if matched else records.load_record(path, depends)
        if record is None:
            fingerprint = self._compute(step, path)
            if fingerprint is None:
                return False  # the next step's predecessor stays the last good one
        else:
            self._finish_pending()
            self._keep(record)
            self.prev = None  # read again only if a later step needs recomputing
        self.prev_step, self.prev_fp = step, fingerprint
        return True

    def _compute(self, step: int, path: Path) -> str | None:
        """Compute the step's record and save it (or queue it for its unit dips); its content id, hashed
        from the tensor as read, or None if the step is excluded."""
        plan = self.plan
        if self.reference is None:
            self.reference = self._prepared(plan.reference_step)
        if self.prev_step is not None and self.prev is None:
            self.prev = self._prepared(self.prev_step)
        # The final step's dips and cuts are known from the meta stage: its record is completed
        # in the pass itself, each unit's two groups included.
        final = self.basis.final_units if step == plan.steps[-1] else None
        try:
            stored = self.reads.get(step)
            current = self._prepared(step, stored)
            record = records.step_record(current, self.reference, self.prev, step, self.prev_step, plan,
                                         self.basis, self.workspace, final)  # fmt: skip
        except BadStep as bad:
            if plan.on_bad_step != "exclude" or step in (plan.reference_step, plan.steps[-1]):
                raise
            log.warning("%s; excluded (series.on_bad_step=exclude)", bad)
            self.excluded[step] = bad.reason
            return None
        fingerprint = self.series.fingerprint_of(step, plan.tensor, stored)
        record["depends"] = records.step_depends(fingerprint, self.ref_fp, self.prev_step, self.prev_fp)
        self.computed += 1
        self._finish_pending()
        if self.dips is None or final is not None:
            self.save(path, record)
            self._keep(record)
        else:
            self.dips.submit(record, path, current, self.basis.units, self._keep)
        self.prev = current
        return fingerprint

    def _prepared(self, step: int, stored: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor as the pass reads it (flat, or 2-D with units), after checking its shape."""
        tensor = self.reads.get(step) if stored is None else stored
        check_shape(tensor, self.basis.meta["shape"], self.plan, step)
        return tensor if self.basis.units is not None else self.basis.sampling.flat(tensor)

    def _waiting(self) -> int:
        """1 while a computed step waits for its unit dips."""
        return int(self.dips is not None and self.dips.pending is not None)

    def _finish_pending(self) -> None:
        if self._waiting():
            self.dips.finish()


def walk_width(basis: Basis, plan: ExtractionPlan) -> int:
    """The largest block of the pass over the basis' tensor: what its workspace must hold."""
    shape = (basis.sampling.n,) if basis.units is None else tuple(basis.meta["shape"])
    return pass_blocks(shape, plan.chunk_size, basis.units)[1]


# ------------------------------------------------------------------------------- a whole-model scan


@dataclass
class ScannedTensor:
    """One tensor of a scan after the pass: its plan, cache folder and basis, and the steps kept (each
    record stays on disk until its trajectory is asked for, so a scan holds one tensor's at a time)."""

    plan: ExtractionPlan
    folder: Path
    basis: Basis
    kept: list[tuple[int, str]]
    excluded: dict[int, str]
    computed: int

    def trajectory(self) -> Trajectory:
        loaded = [records.load_record(records.step_path(self.folder, step), depends)
                  for step, depends in self.kept]  # fmt: skip
        lost = [step for (step, _), record in zip(self.kept, loaded, strict=True) if record is None]
        if lost:
            raise GardenError(f"the records of steps {lost} in {self.folder} changed during the scan")
        trajectory = records.assemble(loaded, self.plan, self.basis)  # type: ignore[arg-type]
        trajectory.meta["excluded_steps"] = {str(step): reason for step, reason in self.excluded.items()}
        return trajectory


class _Writer:
    """Records written by a background thread while the next tensors are computed: a scan writes a small
    file per tensor and step, and creating one costs up to a millisecond on some filesystems. At most
    `depth` records wait; a failed write raises where the scan next saves or drains."""

    def __init__(self, depth: int = 64):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="garden-write")
        self.waiting: deque[Future] = deque()
        self.depth = depth

    def save(self, path: Path, record: dict) -> None:
        while len(self.waiting) >= self.depth:
            self.waiting.popleft().result()
        self.waiting.append(self.pool.submit(records.save_record, path, record))

    def drain(self) -> None:
        while self.waiting:
            self.waiting.popleft().result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class _StepReader:
    """The checkpoints a scan has open (`CheckpointSeries.open_step`, for all the scan's tensors): each
    opened once, kept while a tensor's walk may still read it (the reference, the final step, the
    predecessors, the current step). For a remote series the next `depth` steps are opened (fetched) in
    worker threads while the pass computes; an error surfaces where the pass asks for that step."""

    def __init__(self, series: CheckpointSeries, names: list[str], order: list[int] = (), depth: int = 0):
        self.series, self.names = series, names
        self.open: dict[int, object] = {}
        self.order, self.depth = list(order), max(0, depth)
        self.ahead: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(self.depth, thread_name_prefix="garden-fetch") if self.depth else None

    def get(self, step: int, name: str) -> torch.Tensor:
        if step not in self.open:
            waiting = self.ahead.pop(step, None)
            self.open[step] = (
                waiting.result() if waiting is not None else self.series.open_step(step, self.names)
            )
            self._fetch_ahead(step)
        return self.open[step].get(name)

    def _fetch_ahead(self, step: int) -> None:
        if self.pool is None or step not in self.order:
            return
        for later in self.order[self.order.index(step) + 1 :]:
            if len(self.ahead) >= self.depth:
                break
            if later not in self.open and later not in self.ahead:
                self.ahead[later] = self.pool.submit(self.series.open_step, later, self.names)

    def keep_only(self, steps: set[int]) -> None:
        for step in [s for s in self.open if s not in steps]:
            self.open.pop(step).close()

    def close(self) -> None:
        self.keep_only(set())
        for waiting in self.ahead.values():
            if not waiting.cancel():
                with contextlib.suppress(Exception):
                    waiting.result().close()
        self.ahead.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _TensorReads:
    """One tensor's reads through the scan's open checkpoints (what `_Walk` reads from)."""

    def __init__(self, reader: _StepReader, name: str):
        self.reader, self.name = reader, name

    def get(self, step: int) -> torch.Tensor:
        return self.reader.get(step, self.name)


def extract_scan(
    series: CheckpointSeries,
    plans: list[ExtractionPlan],
    cache_dir: Path,
    progress: bool = True,
    device: torch.device | str = "cpu",
    prefetch: int = 0,
) -> list[ScannedTensor]:
    """Every plan's tensor (same steps, same reference) in one pass over the checkpoints, step by step: a
    checkpoint is opened once for all its tensors, each tensor's record written to the very cache folder a
    one-tensor extraction of it uses (`plan.cache_key`), so either reuses the other's. Each folder is
    locked while this job fills it; folders another job holds are left to it and reused once it is done
    (waiting in a fixed order: two scans never wait on each other in a cycle). For a remote series,
    `prefetch` checkpoints are fetched ahead while one is computed."""
    folders = [Path(cache_dir) / plan.cache_key(series.identity) for plan in plans]
    order = sorted(range(len(plans)), key=lambda i: str(folders[i]))
    done: dict[int, ScannedTensor] = {}
    with series.holding_ids():
        # First the tensors no other job is producing (another scan's shard, a one-tensor job), then,
        # waiting for them, the rest (their records reused).
        for waiting in (False, True):
            todo = [i for i in order if i not in done]
            if not todo:
                break
            with contextlib.ExitStack() as locks:
                held = []
                for i in todo:
                    if waiting:
                        what = f"the extraction of {plans[i].tensor} from {series.identity}"
                        locks.enter_context(cache.producing(folders[i], what))
                        held.append(i)
                    elif locks.enter_context(cache.producing_if_free(folders[i])):
                        held.append(i)
                if held:
                    scanned = _scan(series, [plans[i] for i in held], [folders[i] for i in held], progress,
                                    torch.device(device), prefetch if series.remote else 0)  # fmt: skip
                    done.update(zip(held, scanned, strict=True))
    return [done[i] for i in range(len(plans))]


def _scan(
    series: CheckpointSeries,
    plans: list[ExtractionPlan],
    folders: list[Path],
    progress: bool,
    device: torch.device,
    prefetch: int = 0,
) -> list[ScannedTensor]:
    steps = plans[0].steps
    if any(plan.steps != steps or plan.reference_step != plans[0].reference_step for plan in plans):
        raise ValueError("a scan's plans share their steps and reference step")
    reference, final = plans[0].reference_step, steps[-1]
    # Read ahead in the pass's order: the meta's two steps first, then every step.
    order = list(dict.fromkeys([reference, final, *steps]))
    reader = _StepReader(series, [plan.tensor for plan in plans], order, prefetch)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(reader.close)
        walks: list[_Walk] = []
        bases, fingerprints = [], []
        for plan, folder in zip(plans, folders, strict=True):
            meta = records.current_meta(series, plan, folder)
            reads = _TensorReads(reader, plan.tensor)
            bases.append(records.open_basis(series, plan, folder, meta, reads.get))
            fingerprints.append(series.fingerprint(plan.reference_step, plan.tensor))
            reader.keep_only({reference, final})
        width = max(walk_width(basis, plan) for basis, plan in zip(bases, plans, strict=True))
        workspace = Workspace(width, plans[0].quantile_bins, device)
        cleanup.callback(workspace.close)
        writer = _Writer()
        cleanup.callback(writer.close)  # (after the dips: their records are written through it)
        dips = _DipQueue(writer.save)
        cleanup.callback(dips.close)
        for plan, folder, basis, ref_fp in zip(plans, folders, bases, fingerprints, strict=True):
            _, reusable = _planned_reads(series, plan, folder, ref_fp, keep_records=False)
            reads = _TensorReads(reader, plan.tensor)
            walks.append(_Walk(series, plan, folder, basis, reads, ref_fp, reusable, device, workspace, dips,
                               keep_records=False, save=writer.save))  # fmt: skip
        bar = progress_bar(steps, desc=f"scan {len(plans)} tensors", unit="step", enabled=progress)
        cleanup.callback(bar.close)
        cleanup.enter_context(pass_threads(device))
        started = time.perf_counter()
        try:
            for done, step in enumerate(bar, 1):
                for walk in walks:
                    walk._visit(step)
                    walk.release()
                needed = {w.prev_step for w in walks if w.prev_step is not None}
                reader.keep_only(needed | {reference, final})
                progress_report("extract", step, {"checkpoints_done": float(done),
                                                  "seconds": time.perf_counter() - started})  # fmt: skip
            if dips.pending is not None:
                dips.finish()
            writer.drain()
        except BaseException:
            dips.salvage()
            raise
    computed = sum(walk.computed for walk in walks)
    log.info("scan of %d tensors: %d of %d records computed, %d reused from the cache", len(walks), computed,
             sum(len(w.kept) for w in walks), sum(len(w.kept) for w in walks) - computed)  # fmt: skip
    return [ScannedTensor(w.plan, w.folder, w.basis, w.kept, w.excluded, w.computed) for w in walks]
