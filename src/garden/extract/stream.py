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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from garden import cache
from garden.devices import pass_threads
from garden.extract import records
from garden.extract.kernel import UnitLayout, Workspace, pass_blocks, unit_dips, with_dips
from garden.extract.plan import BadStep, ExtractionPlan, check_shape
from garden.extract.records import Basis
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


def _planned_reads(series: CheckpointSeries, plan: ExtractionPlan, folder: Path,
                   ref_fp: str) -> tuple[list[int], Reusable]:  # fmt: skip
    """The records the pass can reuse (with the dependency string each was checked against), and the
    tensors it will read, in order, for the rest: what the prefetcher fetches ahead."""
    reads: list[int] = []
    reusable: Reusable = {}
    prev_step, prev_fp, reference_read, prev_in_memory = None, "", False, False
    for step in plan.steps:
        fingerprint = series.fingerprint(step, plan.tensor)
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
            reusable[step] = (depends, record)
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
    return trajectory


class _Progress:
    """The progress bar, the live progress report and, for a remote series, the fetch rate."""

    def __init__(self, series: CheckpointSeries, plan: ExtractionPlan, progress: bool):
        self.series = series
        self.bar = tqdm(plan.steps, desc=f"extract {plan.tensor}", unit="step", disable=not progress)
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
    dips: Future


class _DipQueue:
    """Each step's unit dips run in a background thread (`garden.dip`, GIL released) while the next
    checkpoint is read and reduced: at most one step waits for them, its record saved once they are done."""

    def __init__(self, units: UnitLayout):
        self.units = units
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="garden-dip")
        self.pending: _Pending | None = None

    def submit(self, record: dict, path: Path, tensor: torch.Tensor) -> None:
        self.pending = _Pending(record, path, self.worker.submit(unit_dips, self.units, tensor))

    def finish(self) -> dict:
        """Wait for the pending step's unit dips, complete its record and write it to the cache."""
        dips, _ = self.pending.dips.result()
        record = with_dips(self.pending.record, self.units, dips)
        records.save_record(self.pending.path, record)
        self.pending = None
        return record

    def salvage(self) -> None:
        """Interrupted while the step before was still in the background: keep its finished work."""
        if self.pending is not None and not self.pending.dips.cancelled():
            with contextlib.suppress(Exception):
                self.finish()

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)


class _Walk:
    """The steps in order, each record reused or computed against the reference and its predecessor (the
    last good step), holding at most three tensors: the reference, the predecessor and the current one."""

    def __init__(self, series: CheckpointSeries, plan: ExtractionPlan, folder: Path, basis: Basis,
                 reads: Prefetcher, ref_fp: str, reusable: Reusable, device: torch.device):  # fmt: skip
        self.series, self.plan, self.folder, self.basis = series, plan, folder, basis
        self.reads, self.ref_fp, self.reusable = reads, ref_fp, reusable
        shape = (basis.sampling.n,) if basis.units is None else tuple(basis.meta["shape"])
        width = pass_blocks(shape, plan.chunk_size, basis.units)[1]
        self.workspace = Workspace(width, plan.quantile_bins, device)
        self.dips = None if basis.units is None else _DipQueue(basis.units)
        self.records: list[dict] = []
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
        self.workspace.close()
        if self.dips is not None:
            self.dips.close()

    def _visit(self, step: int) -> bool:
        """The step's record, reused or computed; False when the step is excluded."""
        fingerprint = self.series.fingerprint(step, self.plan.tensor)
        depends = records.step_depends(fingerprint, self.ref_fp, self.prev_step, self.prev_fp)
        path = records.step_path(self.folder, step)
        known = self.reusable.pop(step, None)
        record = known[1] if known is not None and known[0] == depends else records.load_record(path, depends)
        if record is None:
            if not self._compute(step, depends, path):
                return False  # the next step's predecessor stays the last good one
        else:
            self._finish_pending()
            self.records.append(record)
            self.prev = None  # read again only if a later step needs recomputing
        self.prev_step, self.prev_fp = step, fingerprint
        return True

    def _compute(self, step: int, depends: str, path: Path) -> bool:
        """Compute the step's record and save it (or queue it for its unit dips); False if excluded."""
        plan = self.plan
        if self.reference is None:
            self.reference = self._prepared(plan.reference_step)
        if self.prev_step is not None and self.prev is None:
            self.prev = self._prepared(self.prev_step)
        # The final step's dips and cuts are known from the meta stage: its record is completed
        # in the pass itself, each unit's two groups included.
        final = self.basis.final_units if step == plan.steps[-1] else None
        try:
            current = self._prepared(step)
            record = records.step_record(current, self.reference, self.prev, step, self.prev_step, plan,
                                         self.basis, self.workspace, final)  # fmt: skip
        except BadStep as bad:
            if plan.on_bad_step != "exclude" or step in (plan.reference_step, plan.steps[-1]):
                raise
            log.warning("%s; excluded (series.on_bad_step=exclude)", bad)
            self.excluded[step] = bad.reason
            return False
        record["depends"] = depends
        self.computed += 1
        self._finish_pending()
        if self.dips is None or final is not None:
            records.save_record(path, record)
            self.records.append(record)
        else:
            self.dips.submit(record, path, current)
        self.prev = current
        return True

    def _prepared(self, step: int) -> torch.Tensor:
        """The tensor as the pass reads it (flat, or 2-D with units), after checking its shape."""
        tensor = self.reads.get(step)
        check_shape(tensor, self.basis.meta["shape"], self.plan, step)
        return tensor if self.basis.units is not None else self.basis.sampling.flat(tensor)

    def _waiting(self) -> int:
        """1 while a computed step waits for its unit dips."""
        return int(self.dips is not None and self.dips.pending is not None)

    def _finish_pending(self) -> None:
        if self._waiting():
            self.records.append(self.dips.finish())
