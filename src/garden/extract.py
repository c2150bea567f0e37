"""The streaming core: checkpoint series -> one tensor per step -> per-step statistics -> Trajectory.

One pass over the steps, holding at most three tensors in their stored dtype (the reference, the
previous step and the current one), whatever the number of steps. Each step's statistics come from a
single fused, chunked pass on `device` (cuda when present): the tensor is converted to float32 one
cache-sized block at a time and every sum (moments about a shift, squared distances to the reference and
to the previous step, the fine histogram, and with units on the same per unit) is taken from that block
while it is hot. A full-size float32 copy is never made. Sums are accumulated across blocks in float64.

Per-unit statistics (a unit is one slice of a 2-D tensor along `extract.unit_axis`, e.g. one hidden
unit's weights to every token of `embed_out.weight`) come from the same pass; each unit's dip test runs
on a seeded sample of its entries in a background thread (`garden.dip`, GIL released) while the next
checkpoint is read and reduced.

Every finished step is written to its own file (atomically) in a cache folder keyed by everything the
numbers depend on (`garden.cache`: the plan, this code's version, and per record the content ids of the
tensors it read), so an interrupted run resumes where it stopped and a rerun recomputes nothing. A job
that finds the folder being produced by another waits for it and reuses its records.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from garden import cache
from garden.dip import dip_pvalues
from garden.errors import GardenError
from garden.progress import report as progress_report
from garden.series import CheckpointSeries, Prefetcher
from garden.trajectory import Trajectory, UnitTrajectory

log = logging.getLogger("garden")
BAD_STEP_POLICIES = ("error", "exclude")


class BadStep(GardenError):
    """A checkpoint whose tensor cannot be analysed: a wrong shape or non-finite values."""

    def __init__(self, step: int, reason: str, hint: str = ""):
        super().__init__(f"step {step}: {reason}{hint}")
        self.step, self.reason = step, reason


EXCLUDE_HINT = " (set series.on_bad_step=exclude to drop such steps with a warning, recorded in the run)"
UNIT_STATS = ("mean", "std", "skewness", "kurtosis", "msd", "dip", "dip_pvalue")
SPLIT_FIELDS = ("cut", "low_count", "low_mean", "high_count", "high_mean")
# Threads the dip kernel uses for one checkpoint's units (it runs beside the streaming pass).
DIP_THREADS = 2


def _unit_axis_setting(value) -> str | int | None:
    """`extract.unit_axis` as given: auto, 0, 1 or null (None); anything else is an error."""
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
        return None
    if isinstance(value, str) and value.lower() == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return value
    raise GardenError(f"extract.unit_axis={value!r} is not valid; valid: auto, 0, 1, null")


@dataclass(frozen=True)
class ExtractionPlan:
    """What to extract: the tensor, the steps, and the settings every recorded number depends on."""

    tensor: str
    steps: tuple[int, ...]
    reference_step: int
    subsample: int | None = None
    n_trajectories: int = 256
    n_distribution_sample: int = 20000
    histogram_bins: int = 256
    quantile_bins: int = 65536
    quantiles: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
    histogram_range: float | None = None
    chunk_size: int = 1 << 18
    seed: int = 0
    unit_axis: str | int | None = "auto"
    unit_sample: int = 4096
    # What a step with a wrong shape or non-finite values does: error (the job fails naming it) | exclude
    # (dropped with a warning, recorded in the trajectory's meta). Not part of the cache key.
    on_bad_step: str = "error"

    @classmethod
    def from_config(cls, extract_cfg, tensor: str, steps: list[int],
                    on_bad_step: str = "error") -> ExtractionPlan:  # fmt: skip
        """Build and validate a plan from the `extract` config section (fails before any reading)."""
        reference = extract_cfg.get("reference_step")
        plan = cls(
            tensor=tensor,
            steps=tuple(steps),
            reference_step=steps[0] if reference is None else int(reference),
            subsample=None if extract_cfg.get("subsample") is None else int(extract_cfg.subsample),
            n_trajectories=int(extract_cfg.n_trajectories),
            n_distribution_sample=int(extract_cfg.n_distribution_sample),
            histogram_bins=int(extract_cfg.histogram_bins),
            quantile_bins=int(extract_cfg.quantile_bins),
            quantiles=tuple(float(q) for q in extract_cfg.quantiles),
            histogram_range=None
            if extract_cfg.get("histogram_range") is None
            else float(extract_cfg.histogram_range),
            chunk_size=int(extract_cfg.chunk_size),
            seed=int(extract_cfg.seed),
            unit_axis=_unit_axis_setting(extract_cfg.get("unit_axis", "auto")),
            unit_sample=int(extract_cfg.get("unit_sample", 4096)),
            on_bad_step=str(on_bad_step),
        )
        plan.validate()
        return plan

    def validate(self) -> None:
        if self.subsample is not None and self.subsample < 2:
            raise GardenError(f"extract.subsample must be null or at least 2, got {self.subsample}")
        for name in ("n_trajectories", "n_distribution_sample"):
            if getattr(self, name) < 0:
                raise GardenError(f"extract.{name} must be >= 0, got {getattr(self, name)}")
        if self.histogram_bins < 1 or self.quantile_bins % self.histogram_bins:
            raise GardenError(
                f"extract.quantile_bins ({self.quantile_bins}) must be a positive multiple of "
                f"extract.histogram_bins ({self.histogram_bins})"
            )
        if not all(0.0 <= q <= 1.0 for q in self.quantiles):
            raise GardenError(f"extract.quantiles must lie in [0, 1], got {list(self.quantiles)}")
        if self.histogram_range is not None and self.histogram_range <= 0:
            raise GardenError(f"extract.histogram_range must be positive or null, got {self.histogram_range}")
        if self.chunk_size < 1:
            raise GardenError(f"extract.chunk_size must be positive, got {self.chunk_size}")
        _unit_axis_setting(self.unit_axis)
        if self.unit_sample < 4:
            raise GardenError(
                f"extract.unit_sample must be at least 4 (the dip test needs n > 3), got {self.unit_sample}"
            )
        if self.subsample is not None and self.unit_axis in (0, 1):
            raise GardenError(
                f"extract.unit_axis={self.unit_axis} needs the whole tensor, but extract.subsample="
                f"{self.subsample} analyses a random subset of its parameters, which has no units; "
                "set extract.subsample=null or extract.unit_axis=null"
            )

    def resolve_unit_axis(self, shape: tuple[int, ...]) -> int | None:
        """The unit axis for a tensor of this shape: `auto` is axis 1 of a 2-D tensor (off for any other
        shape, and with a subsample); an explicit axis must exist and leave units of at least 4 entries."""
        axis = self.unit_axis
        if axis is None or (axis == "auto" and (len(shape) != 2 or self.subsample is not None)):
            return None
        if len(shape) != 2:
            raise GardenError(
                f"extract.unit_axis={axis} needs a 2-D tensor, but {self.tensor} has shape {list(shape)}; "
                "valid for this tensor: auto, null"
            )
        axis = 1 if axis == "auto" else int(axis)
        length = shape[0] if axis == 1 else shape[1]
        if length < 4:
            if self.unit_axis == "auto":
                return None
            raise GardenError(
                f"extract.unit_axis={axis}: the units of {self.tensor} {list(shape)} have {length} entries, "
                "too few for a dip test (at least 4); valid: the other axis, auto, null"
            )
        return axis

    def cache_key(self, series_identity: str) -> str:
        """Hash of what the per-step numbers depend on: not the step list or chunking, but the last
        selected step, whose values (with the reference's) fix the shared histogram range."""
        fields = asdict(self)
        del fields["steps"], fields["chunk_size"], fields["on_bad_step"]
        fields["range_basis_step"] = self.steps[-1]
        return cache.cache_key("extract", series=series_identity, **fields)


def quantile_column(q: float) -> str:
    return f"q{round(q * 100):02d}" if abs(q * 100 - round(q * 100)) < 1e-9 else f"q{q:g}"


class _Sampling:
    """The seeded index sets: optional subsample of the tensor, tracked parameters, distribution sample."""

    def __init__(self, numel: int, plan: ExtractionPlan):
        rng = np.random.default_rng(plan.seed)
        self.subsample = None
        n = numel
        if plan.subsample is not None and plan.subsample < numel:
            self.subsample = np.sort(rng.choice(numel, size=plan.subsample, replace=False))
            n = plan.subsample
        self.n = n
        self.trajectories = np.sort(rng.choice(n, size=min(plan.n_trajectories, n), replace=False))
        self.distribution = np.sort(rng.choice(n, size=min(plan.n_distribution_sample, n), replace=False))
        self._subsample_t = None if self.subsample is None else torch.from_numpy(self.subsample)

    def flat(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.reshape(-1)
        return flat if self._subsample_t is None else flat[self._subsample_t]


class UnitLayout:
    """Units of a 2-D tensor: axis 1 makes each column a unit (for `embed_out.weight` [vocab, hidden],
    one hidden unit's weights to every token), axis 0 each row. The dip sample is the same seeded set of
    positions along every unit's slice, at every step."""

    def __init__(self, shape: tuple[int, ...], axis: int, unit_sample: int, seed: int):
        rows, cols = shape
        self.axis = axis
        self.n_units = cols if axis == 1 else rows
        self.length = rows if axis == 1 else cols
        size = min(unit_sample, self.length)
        rng = np.random.default_rng([seed, 1])  # a stream of its own: the pooled samples stay as they were
        self.positions = (
            np.arange(self.length) if size == self.length else np.sort(rng.choice(self.length, size, False))
        )
        self._positions_t = torch.from_numpy(self.positions)

    def samples(self, tensor: torch.Tensor) -> torch.Tensor:
        """[units, sample] in the stored dtype: each unit's entries at the sampled positions."""
        if self.axis == 1:
            return tensor.index_select(0, self._positions_t).t().contiguous()
        return tensor.index_select(1, self._positions_t).contiguous()

    def unit_values(self, tensor: torch.Tensor, unit: int) -> torch.Tensor:
        return (tensor[:, unit] if self.axis == 1 else tensor[unit]).float()


class Workspace:
    """Block buffers reused by every step: steady allocations keep peak memory flat over any number of
    steps (fresh multi-MB buffers per step let glibc's heap creep up as its mmap threshold adapts)."""

    def __init__(self, chunk_size: int, fine_bins: int, device: torch.device | str = "cpu"):
        self.chunk = torch.empty(chunk_size, dtype=torch.float32, device=device)
        self.work = torch.empty(chunk_size, dtype=torch.float32, device=device)
        self.work2 = torch.empty(chunk_size, dtype=torch.float32, device=device)
        # The histogram's own buffers: it runs in a helper thread beside the sums.
        self.hist_chunk = torch.empty(chunk_size, dtype=torch.float32, device=device)
        # Bin indices: int32 makes torch.bincount ~1.5x faster than int64 on the CPU.
        self.bins = torch.empty(chunk_size, dtype=torch.int32, device=device)
        self.hist = torch.empty(fine_bins, dtype=torch.int64, device=device)
        self.device = torch.device(device)
        self.helper = ThreadPoolExecutor(1, thread_name_prefix="garden-hist")

    def close(self) -> None:
        self.helper.shutdown(wait=True)


def _histogram(flat: torch.Tensor, blocks, cols: int, lo: float, hi: float, space: Workspace):
    """The fine histogram (values outside [lo, hi] in the end bins) and the extremes of a tensor.

    torch.bincount is single-threaded on the CPU and the largest single cost of the pass, so this runs in
    the workspace's helper thread, over its own buffers, while the calling thread takes the sums."""
    fine_bins = space.hist.numel()
    scale = fine_bins / (hi - lo)
    offset = torch.tensor(-lo * scale, device=space.device)
    hist = space.hist
    hist.zero_()
    vmin = torch.full((), float("inf"), device=space.device)
    vmax = torch.full((), float("-inf"), device=space.device)
    for start, stop in blocks:
        size = (stop - start) * cols
        c, bins = space.hist_chunk[:size], space.bins[:size]
        c.copy_(flat[start:stop].reshape(-1), non_blocking=True)
        cmin, cmax = torch.aminmax(c)
        vmin, vmax = torch.minimum(vmin, cmin), torch.maximum(vmax, cmax)
        if not bool(torch.isfinite(cmin + cmax)):  # NaN/inf: the extremes carry them to the step's check;
            c.nan_to_num_(nan=lo, posinf=hi, neginf=lo)  # the bins must stay valid indices
        # bin = floor((v - lo) * scale), clamped into the end bins.
        torch.add(offset, c, alpha=scale, out=c)
        c.clamp_(0, fine_bins - 1)
        bins.copy_(c)
        hist += torch.bincount(bins, minlength=fine_bins)
    return hist, vmin, vmax


def _blocks(shape: tuple[int, ...], chunk_size: int, units: UnitLayout | None):
    """(start, stop) of the blocks of the pass over a tensor of this shape, and the largest block's size:
    flat chunks, or whole rows when units are on."""
    if units is None:
        n = int(np.prod(shape))
        width = min(chunk_size, n)
        return [(s, min(s + width, n)) for s in range(0, n, width)], width
    rows, cols = shape
    per = max(1, chunk_size // cols)
    return [(s, min(s + per, rows)) for s in range(0, rows, per)], per * cols


def step_statistics(
    x: torch.Tensor,
    ref: torch.Tensor | None,
    prev: torch.Tensor | None,
    lo: float,
    hi: float,
    fine_bins: int,
    chunk_size: int,
    workspace: Workspace | None = None,
    units: UnitLayout | None = None,
    cuts: np.ndarray | None = None,
) -> dict:
    """Fused blocked pass: power sums about a shift, distances, extremes, fine histogram; per unit too.

    Without units, `x` is flat and the moments are taken about one shift (the first block's mean); with
    units, `x` is the 2-D tensor, each unit's sums are taken about its own shift (axis 1: the first
    block's column means; axis 0: each row's own mean, every row lying in one block), and the pooled
    moments are combined from the units' exactly. Block sums are float32, their accumulation float64, and
    central moments are formed in float64, which keeps them exact when |mean| >> std. Values outside
    [lo, hi] are counted in the end bins. With `cuts` (one per unit), each unit's two groups (entries at
    or below its cut, and above) are counted and summed in the same pass.
    """
    n = x.numel()
    blocks, width = _blocks(tuple(x.shape), chunk_size, units)
    device = workspace.device if workspace is not None else torch.device("cpu")
    fits = workspace is not None and workspace.chunk.numel() >= width and workspace.hist.numel() == fine_bins
    space = workspace if fits else Workspace(width, fine_bins, device)
    try:
        return _statistics(x, ref, prev, lo, hi, blocks, space, units, n, cuts)
    finally:
        if space is not workspace:
            space.close()


def _statistics(x, ref, prev, lo, hi, blocks, space: Workspace, units: UnitLayout | None, n: int,
                cuts: np.ndarray | None) -> dict:  # fmt: skip
    device = space.device
    f64 = dict(dtype=torch.float64, device=device)
    # acc: s1..s4 (pooled, without units), squared distances to the reference and to the previous step.
    acc = torch.zeros(6, **f64)
    flat = x.reshape(-1) if units is None else x
    cols = 1 if units is None else x.shape[1]
    histogram = space.helper.submit(_histogram, flat, blocks, cols, lo, hi, space)
    ref_v = None if ref is None else (ref.reshape(-1) if units is None else ref)
    prev_v = None if prev is None else (prev.reshape(-1) if units is None else prev)
    if units is not None:
        power = torch.zeros(4, units.n_units, **f64)
        unit_sq_ref = torch.zeros(units.n_units, **f64)
        shift_units = torch.zeros(units.n_units, **f64)
        low = None
        if cuts is not None:
            cut = torch.as_tensor(cuts, dtype=torch.float32, device=device)
            low = torch.zeros(2, units.n_units, **f64)  # count and sum of each unit's lower group
    shift = None
    for start, stop in blocks:
        size = (stop - start) * (1 if units is None else cols)
        c, tmp, tmp2 = space.chunk[:size], space.work[:size], space.work2[:size]
        c.copy_(flat[start:stop].reshape(-1), non_blocking=True)
        if ref_v is not None:
            torch.sub(c, ref_v[start:stop].reshape(-1).to(device, non_blocking=True), out=tmp)
            if units is None:
                acc[4] += torch.dot(tmp, tmp)
            else:
                tmp.mul_(tmp)
                _unit_sum(tmp, cols, units.axis, unit_sq_ref, start, stop)
        if prev_v is not None:
            torch.sub(c, prev_v[start:stop].reshape(-1).to(device, non_blocking=True), out=tmp)
            acc[5] += torch.dot(tmp, tmp)
        if units is None:
            if shift is None:
                shift = _on_grid(c.mean(), x.dtype)
            c.sub_(shift)
            acc[0] += c.sum()
            torch.mul(c, c, out=tmp)
            acc[1] += tmp.sum()
            acc[2] += torch.dot(tmp, c)
            acc[3] += torch.dot(tmp, tmp)
        else:
            if low is not None:
                block = c.view(-1, cols)
                below = block <= (cut[None, :] if units.axis == 1 else cut[start:stop, None])
                _unit_sum(below.view(-1), cols, units.axis, low[0], start, stop, exact=True)
                torch.mul(c, below.view(-1), out=tmp2)
                _unit_sum(tmp2, cols, units.axis, low[1], start, stop, exact=True)
            _unit_powers(c, tmp, tmp2, cols, units.axis, power, shift_units, start, stop, x.dtype)
    if units is not None and ref is not None:
        acc[4] = unit_sq_ref.sum()
    hist, vmin, vmax = histogram.result()
    results = torch.cat([acc, torch.stack([vmin, vmax]).double()]).cpu().tolist()
    out = {
        "min": results[6],
        "max": results[7],
        "msd": results[4] / n if ref is not None else float("nan"),
        "step_msd": results[5] / n if prev is not None else float("nan"),
        "fine_hist": hist.cpu().numpy().astype(np.float64),
    }
    if units is None:
        shift_value = float(shift)
        mu1, e2, e3, e4 = (v / n for v in results[:4])
        m2 = max(e2 - mu1**2, 0.0)
        m3 = e3 - 3 * mu1 * e2 + 2 * mu1**3
        m4 = e4 - 4 * mu1 * e3 + 6 * mu1**2 * e2 - 3 * mu1**4
        out.update(_shape_of(shift_value + mu1, m2, m3, m4))
        out["rms"] = max(e2 + 2 * shift_value * mu1 + shift_value**2, 0.0) ** 0.5
        return out
    # Per unit: central moments from the power sums about each unit's shift (float64).
    length = units.length
    s = power.cpu().numpy() / length
    mu1 = s[0]
    m2 = np.maximum(s[1] - mu1**2, 0.0)
    m3 = s[2] - 3 * mu1 * s[1] + 2 * mu1**3
    m4 = s[3] - 4 * mu1 * s[2] + 6 * mu1**2 * s[1] - 3 * mu1**4
    means = shift_units.cpu().numpy() + mu1
    unit = _shape_of(means, m2, m3, m4)
    unit["msd"] = unit_sq_ref.cpu().numpy() / length if ref is not None else np.full(len(means), np.nan)
    # Pooled moments: each unit's about the pooled mean (parallel-axis terms), summed.
    mean = float(means.mean())
    delta = means - mean
    p2 = float(np.mean(m2 + delta**2))
    p3 = float(np.mean(m3 + 3 * delta * m2 + delta**3))
    p4 = float(np.mean(m4 + 4 * delta * m3 + 6 * delta**2 * m2 + delta**4))
    out.update(_shape_of(mean, p2, p3, p4))
    out["rms"] = (p2 + mean**2) ** 0.5
    if low is not None:
        low_count, low_sum = low.cpu().numpy()
        high_count = length - low_count
        with np.errstate(invalid="ignore", divide="ignore"):
            unit["split"] = {
                "cut": np.asarray(cuts, dtype=np.float64),
                "low_count": low_count,
                "low_mean": low_sum / low_count,
                "high_count": high_count,
                "high_mean": (means * length - low_sum) / high_count,
            }
    out["units"] = unit
    return out


def _shape_of(mean, m2, m3, m4) -> dict:
    """Mean, std, skewness and excess kurtosis from central moments (NaN where the variance is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        positive = np.asarray(m2) > 0
        skew = np.where(positive, m3 / np.where(positive, m2, 1.0) ** 1.5, np.nan)
        kurt = np.where(positive, m4 / np.where(positive, m2, 1.0) ** 2 - 3.0, np.nan)
    as_out = (lambda v: float(v)) if np.ndim(mean) == 0 else (lambda v: np.asarray(v, dtype=np.float64))
    return {
        "mean": as_out(mean),
        "std": as_out(np.sqrt(m2)),
        "skewness": as_out(skew),
        "kurtosis": as_out(kurt),
    }


def _unit_sum(
    values: torch.Tensor, cols: int, axis: int, into: torch.Tensor, start: int, stop: int, exact: bool = False
) -> None:
    """Add a block's per-unit sums into float64 accumulators: float32 within the block (torch sums
    pairwise), or float64 throughout where `exact` (the first power, which gives the mean: a mean near 0
    needs it to be exact relative to itself)."""
    block = values.view(-1, cols)
    dtype = torch.float64 if exact else None
    if axis == 1:
        into += block.sum(0, dtype=dtype)
    else:
        into[start:stop] += block.sum(1, dtype=dtype)


def _on_grid(shift: torch.Tensor, stored: torch.dtype) -> torch.Tensor:
    """A shift rounded to the stored dtype when it is a 16-bit float: the difference of two such values
    is exact in float32 (for weights of |value| < 1), so moments about it lose no bits even when
    |mean| >> std. Float32 data keeps the float32 shift."""
    if stored in (torch.float16, torch.bfloat16):
        return shift.to(stored).float()
    return shift


def _unit_powers(c, tmp, tmp2, cols, axis, power, shift_units, start, stop, stored) -> None:
    """Power sums 1..4 of each unit's values about its shift, from one block (c is overwritten)."""
    block = c.view(-1, cols)
    if axis == 1:
        if start == 0:
            shift_units.copy_(_on_grid(block.mean(0), stored))
        block.sub_(shift_units.to(block.dtype))
    else:
        row_means = _on_grid(block.mean(1), stored)
        shift_units[start:stop] = row_means
        block.sub_(row_means[:, None])
    _unit_sum(c, cols, axis, power[0], start, stop, exact=True)
    torch.mul(c, c, out=tmp)
    _unit_sum(tmp, cols, axis, power[1], start, stop)
    torch.mul(tmp, c, out=tmp2)
    _unit_sum(tmp2, cols, axis, power[2], start, stop)
    tmp.mul_(tmp)
    _unit_sum(tmp, cols, axis, power[3], start, stop)


def histogram_quantiles(
    counts: np.ndarray, lo: float, hi: float, qs, vmin: float, vmax: float
) -> list[float]:
    """Quantiles (numpy's 'linear' rank q*(n-1)) read off a fine histogram, spreading each bin evenly.

    Exact to within one fine bin width; an exact selection would cost a sort per step (~5x the read).
    """
    cum = np.cumsum(counts)
    n = cum[-1]
    bin_width = (hi - lo) / len(counts)
    out = []
    for q in qs:
        rank = q * (n - 1)
        b = int(np.searchsorted(cum, rank, side="right"))
        b = min(b, len(counts) - 1)
        before = cum[b - 1] if b > 0 else 0.0
        frac = (rank - before + 0.5) / counts[b] if counts[b] > 0 else 0.5
        out.append(float(np.clip(lo + (b + frac) * bin_width, vmin, vmax)))
    return out


def unit_dips(units: UnitLayout, tensor: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Every unit's dip statistic and two-means cut on its seeded sample (see `garden.dip`)."""
    from garden.dip import dips_and_cuts

    return dips_and_cuts(units.samples(tensor), threads=DIP_THREADS)


@dataclass
class _Pending:
    """A computed step whose unit dips are still running in the background."""

    record: dict
    path: Path
    dips: Future


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


def _step_depends(fingerprint: str, ref_fp: str, prev_step: int | None, prev_fp: str) -> str:
    """What a step's record was computed from: its weights, the reference's and its predecessor's."""
    return f"{fingerprint}|ref:{ref_fp}|prev:{prev_step}:{prev_fp}"


def _planned_reads(series: CheckpointSeries, plan: ExtractionPlan, folder: Path,
                   ref_fp: str) -> tuple[list[int], dict[int, tuple[str, dict]]]:  # fmt: skip
    """The records the pass can reuse (with the dependency string each was checked against), and the
    tensors it will read, in order, for the rest: what the prefetcher fetches ahead."""
    reads: list[int] = []
    reusable: dict[int, tuple[str, dict]] = {}
    prev_step, prev_fp, reference_read, prev_in_memory = None, "", False, False
    for step in plan.steps:
        fingerprint = series.fingerprint(step, plan.tensor)
        depends = _step_depends(fingerprint, ref_fp, prev_step, prev_fp)
        record = _load_record(folder / "steps" / f"step{step}.npz", depends)
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
    meta = _current_meta(series, plan, folder)
    ref_fp = series.fingerprint(plan.reference_step, plan.tensor)
    planned, reusable = _planned_reads(series, plan, folder, ref_fp)
    # One read-ahead queue for the whole job: the meta stage's reads (the reference and the final step)
    # first, then the pass's, so that a remote series is fetching the first steps while the meta is made.
    meta_reads = [] if meta is not None else _meta_reads(plan)
    reads = Prefetcher(lambda step: series.read_tensor(step, plan.tensor), meta_reads + planned, prefetch)
    try:
        meta = meta if meta is not None else _make_meta(series, plan, folder, reads.get)
        sampling = _Sampling(int(np.prod(meta["shape"])), plan)
        units = _unit_layout(meta, plan)
        final_units = None if units is None else _final_units(reads.get, plan, folder, units)
    except BaseException:
        reads.close()
        raise
    lo, hi = -meta["half_range"], meta["half_range"]
    reference = None
    prev_step: int | None = None
    prev_fp = ""
    prev: torch.Tensor | None = None
    records = []
    computed = 0
    excluded: dict[int, str] = {}
    pending: _Pending | None = None
    width = _blocks((sampling.n,) if units is None else tuple(meta["shape"]), plan.chunk_size, units)[1]
    workspace = Workspace(width, plan.quantile_bins, device)
    dip_worker = ThreadPoolExecutor(1, thread_name_prefix="garden-dip") if units is not None else None
    bar = tqdm(plan.steps, desc=f"extract {plan.tensor}", unit="step", disable=not progress)
    fetched_before, started = series.bytes_fetched(), time.perf_counter()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # The sums, the histogram helper and the dip worker run at once: leave those two a core each
        # rather than let torch's intra-op threads oversubscribe the machine.
        torch.set_num_threads(max(1, threads - 2))
    try:
        for step in bar:
            fingerprint = series.fingerprint(step, plan.tensor)
            depends = _step_depends(fingerprint, ref_fp, prev_step, prev_fp)
            path = folder / "steps" / f"step{step}.npz"
            known = reusable.pop(step, None)
            record = known[1] if known is not None and known[0] == depends else _load_record(path, depends)
            if record is None:
                if reference is None:
                    reference = _prepared(reads.get(plan.reference_step), sampling, units, plan, meta,
                                          plan.reference_step)  # fmt: skip
                if prev_step is not None and prev is None:
                    prev = _prepared(reads.get(prev_step), sampling, units, plan, meta, prev_step)
                # The final step's dips and cuts are known from the meta stage: its record is completed
                # in the pass itself, each unit's two groups included.
                final = final_units if step == plan.steps[-1] else None
                try:
                    current = _prepared(reads.get(step), sampling, units, plan, meta, step)
                    record = _compute_record(current, reference, prev, step, prev_step, plan, sampling,
                                             units, meta, lo, hi, workspace, final)  # fmt: skip
                except BadStep as bad:
                    if plan.on_bad_step != "exclude" or step in (plan.reference_step, plan.steps[-1]):
                        raise
                    log.warning("%s; excluded (series.on_bad_step=exclude)", bad)
                    excluded[step] = bad.reason
                    continue  # the next step's predecessor stays the last good one
                record["depends"] = depends
                computed += 1
                if pending is not None:
                    records.append(_finish(pending, units))
                    pending = None
                if units is None or final is not None:
                    _save_record(path, record)
                    records.append(record)
                else:
                    pending = _Pending(record, path, dip_worker.submit(unit_dips, units, current))
                prev = current
            else:
                if pending is not None:
                    records.append(_finish(pending, units))
                    pending = None
                records.append(record)
                prev = None  # read again only if a later step needs recomputing
            prev_step, prev_fp = step, fingerprint
            progress_report("extract", step, {"checkpoints_done": float(len(records) + (pending is not None)),
                                              "seconds": time.perf_counter() - started})  # fmt: skip
            if series.remote:
                bar.set_postfix_str(_fetch_rate(series.bytes_fetched() - fetched_before, started))
        if pending is not None:
            records.append(_finish(pending, units))
            pending = None
    except BaseException:
        if pending is not None and not pending.dips.cancelled():
            # Interrupted while the step before was still in the background: keep its finished work.
            with contextlib.suppress(Exception):
                _finish(pending, units)
        raise
    finally:
        reads.close()
        torch.set_num_threads(threads)
        bar.close()
        workspace.close()
        if dip_worker is not None:
            dip_worker.shutdown(wait=True, cancel_futures=True)
    log.info("extract %s: %d of %d steps computed, %d reused from the cache (%s)", plan.tensor, computed,
             len(records), len(records) - computed, folder)  # fmt: skip
    if series.remote:
        log.info("extract %s: fetched %s", plan.tensor,
                 _fetch_rate(series.bytes_fetched() - fetched_before, started))  # fmt: skip
    trajectory = _assemble(records, plan, meta, sampling, units, lo, hi)
    trajectory.meta["excluded_steps"] = {str(step): reason for step, reason in excluded.items()}
    return trajectory


def _fetch_rate(fetched: int, started: float) -> str:
    """Bytes fetched and the rate since `started`, for the progress bar and the log."""
    seconds = max(time.perf_counter() - started, 1e-9)
    return f"{fetched / 1e6:.1f} MB fetched, {fetched / 1e6 / seconds:.1f} MB/s"


def _check_shape(tensor: torch.Tensor, shape, plan: ExtractionPlan, step: int,
                 hint: str = EXCLUDE_HINT) -> None:  # fmt: skip
    if list(tensor.shape) != list(shape):
        raise BadStep(step, f"{plan.tensor} has shape {list(tensor.shape)}, the reference step "
                            f"{plan.reference_step} has {list(shape)}", hint)  # fmt: skip


def _check_finite(tensor: torch.Tensor, plan: ExtractionPlan, step: int, role: str) -> None:
    """The reference and final steps fix the shared histogram range: they are checked before the pass
    and cannot be excluded."""
    if not bool(torch.isfinite(tensor).all()):
        raise BadStep(step, f"{plan.tensor} holds non-finite values (NaN or inf) at the {role} step, "
                            "which every other step is measured against; select other steps")  # fmt: skip


def _prepared(tensor: torch.Tensor, sampling: _Sampling, units, plan, meta, step: int) -> torch.Tensor:
    """The tensor as the pass reads it (flat, or 2-D with units), after checking its shape."""
    _check_shape(tensor, meta["shape"], plan, step)
    return tensor if units is not None else sampling.flat(tensor)


def _unit_layout(meta: dict, plan: ExtractionPlan) -> UnitLayout | None:
    axis = meta.get("unit_axis")
    return None if axis is None else UnitLayout(tuple(meta["shape"]), axis, plan.unit_sample, plan.seed)


def _compute_record(x, ref, prev, step, prev_step, plan, sampling, units, meta, lo, hi, workspace,
                    final: dict | None = None) -> dict:  # fmt: skip
    cuts = None if final is None else final["cuts"]
    stats = step_statistics(x, ref, prev, lo, hi, plan.quantile_bins, plan.chunk_size, workspace, units, cuts)
    if not (np.isfinite(stats["min"]) and np.isfinite(stats["max"])):
        raise BadStep(step, f"{plan.tensor} holds non-finite values (NaN or inf)", EXCLUDE_HINT)
    fine = stats.pop("fine_hist")
    unit_stats = stats.pop("units", None)
    quantiles = histogram_quantiles(fine, lo, hi, plan.quantiles, stats["min"], stats["max"])
    record = {"step": step, "prev_step": -1 if prev_step is None else prev_step, **stats}
    record.update({quantile_column(q): v for q, v in zip(plan.quantiles, quantiles, strict=True)})
    gap = (step - prev_step) if prev_step is not None else 0
    record["displacement"] = stats["step_msd"] / gap if gap > 0 else float("nan")
    record["hist"] = fine.reshape(plan.histogram_bins, -1).sum(axis=1)
    flat = x.reshape(-1) if units is not None else x
    record["trajectories"] = flat[torch.from_numpy(sampling.trajectories)].float().numpy()
    record["distribution_sample"] = flat[torch.from_numpy(sampling.distribution)].float().numpy()
    if unit_stats is not None:
        for name in ("mean", "std", "skewness", "kurtosis", "msd"):
            record[f"unit_{name}"] = unit_stats[name]
        featured = units.unit_values(x, meta["featured_unit"])
        edges = np.asarray(meta["featured_edges"])
        record["featured_hist"] = np.histogram(featured.numpy().clip(edges[0], edges[-1]), bins=edges)[0]
        record["featured_values"] = featured[torch.tensor(meta["featured_positions"])].numpy()
    if final is not None:
        record["unit_dip"] = final["dips"]
        record["unit_dip_pvalue"] = dip_pvalues(len(units.positions), final["dips"])
        for name, values in unit_stats["split"].items():
            record[f"split_{name}"] = values
    return record


def _finish(pending: _Pending, units: UnitLayout) -> dict:
    """Wait for a step's unit dips, complete its record and write it to the cache."""
    dips, _ = pending.dips.result()
    record = pending.record
    record["unit_dip"] = dips
    record["unit_dip_pvalue"] = dip_pvalues(len(units.positions), dips)
    _save_record(pending.path, record)
    return record


def _meta_depends(series: CheckpointSeries, plan: ExtractionPlan) -> dict[str, str]:
    return {
        "reference": series.fingerprint(plan.reference_step, plan.tensor),
        "final": series.fingerprint(plan.steps[-1], plan.tensor),
    }


def _current_meta(series: CheckpointSeries, plan: ExtractionPlan, folder: Path) -> dict | None:
    """The cache folder's meta record if it was made from the same reference and final step; None when
    it must be made (step records made under a meta that no longer holds are dropped: the shared
    histogram range they used has changed)."""
    meta = cache.read_json(folder / "meta.json", "extraction meta record")
    if meta is None:
        return None
    if meta.get("depends") == _meta_depends(series, plan):
        return meta
    log.warning("the reference or final step of %s changed since %s was made: starting it afresh",
                series.identity, folder)  # fmt: skip
    shutil.rmtree(folder / "steps", ignore_errors=True)  # (under this job's lock)
    return None


def _meta_reads(plan: ExtractionPlan) -> list[int]:
    """What `_make_meta` reads: the reference, and the final step unless the histogram range is given
    and units are off."""
    needs_final = plan.histogram_range is None or plan.unit_axis is not None
    return [plan.reference_step, *([plan.steps[-1]] if needs_final else [])]


def _make_meta(series: CheckpointSeries, plan: ExtractionPlan, folder: Path,
               read: Callable[[int], torch.Tensor]) -> dict:  # fmt: skip
    """Shape, dtype, the shared histogram range and the unit layout, fixed once per cache folder (whose
    key names the last selected step, so nothing depends on which run filled the cache first).

    With units on, the featured unit (the figures' most bimodal one: the largest dip at the final step)
    is chosen here too, so that its values can be recorded at every step in the one pass."""
    final_step = plan.steps[-1]
    depends = _meta_depends(series, plan)
    meta_path = folder / "meta.json"
    ref = read(plan.reference_step)
    _check_finite(ref, plan, plan.reference_step, "reference")
    shape = tuple(ref.shape)
    axis = plan.resolve_unit_axis(shape)
    final = None
    if plan.histogram_range is None or axis is not None:
        final = read(final_step)
        _check_shape(final, shape, plan, final_step, " (the final step fixes the shared histogram range and "
                                                    "cannot be excluded; select other steps)")  # fmt: skip
        _check_finite(final, plan, final_step, "final")
    if plan.histogram_range is not None:
        half_range = plan.histogram_range
    else:
        half_range = 1.25 * max(float(ref.abs().max()), float(final.abs().max()))
        half_range = half_range if half_range > 0 else 1.0
    meta = {
        "tensor": plan.tensor,
        "shape": list(shape),
        "dtype": str(ref.dtype).removeprefix("torch."),
        "half_range": half_range,
        "reference_step": plan.reference_step,
        "final_step": final_step,
        "series": series.identity,
        "depends": depends,
        "unit_axis": axis,
    }
    if axis is not None:
        meta.update(_featured_unit(UnitLayout(shape, axis, plan.unit_sample, plan.seed), ref, final, plan,
                                   folder))  # fmt: skip
    cache.write_json(meta_path, meta)
    return meta


def _featured_unit(
    units: UnitLayout, ref: torch.Tensor, final: torch.Tensor, plan: ExtractionPlan, folder: Path
) -> dict:
    """The unit with the largest final dip, its histogram edges and its tracked positions; the final
    step's dips and cuts are kept for its record (`final_units.npz`)."""
    dips = _write_final_units(units, final, folder)["dips"]
    unit = int(np.argmax(dips))
    extent = max(
        float(units.unit_values(ref, unit).abs().max()), float(units.unit_values(final, unit).abs().max())
    )
    half = 1.25 * extent if extent > 0 else 1.0
    rng = np.random.default_rng([plan.seed, 2])
    count = min(plan.n_trajectories, units.length)
    return {
        "featured_unit": unit,
        "featured_edges": np.linspace(-half, half, plan.histogram_bins + 1).tolist(),
        "featured_positions": np.sort(rng.choice(units.length, count, replace=False)).tolist(),
    }


FINAL_UNITS = "final_units.npz"


def _write_final_units(units: UnitLayout, final: torch.Tensor, folder: Path) -> dict[str, np.ndarray]:
    dips, cuts = unit_dips(units, final)
    folder.mkdir(parents=True, exist_ok=True)
    _save_record(folder / FINAL_UNITS, {"dips": dips, "cuts": cuts})
    return {"dips": dips, "cuts": cuts}


def _final_units(read: Callable[[int], torch.Tensor], plan: ExtractionPlan, folder: Path,
                 units: UnitLayout) -> dict[str, np.ndarray]:  # fmt: skip
    """The final step's dips and cuts from the meta stage (made again if the file is missing or damaged)."""

    def load(path: Path) -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as data:
            return {"dips": data["dips"], "cuts": data["cuts"]}

    found = cache.read_or_none(folder / FINAL_UNITS, load, "extraction record")
    if found is not None and len(found["dips"]) == units.n_units:
        return found
    return _write_final_units(units, read(plan.steps[-1]), folder)


def _read_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _load_record(path: Path, depends: str) -> dict | None:
    """A step's record if it was made from the same content (a damaged one is recomputed, with a warning)."""
    record = cache.read_or_none(path, _read_npz, "extraction record")
    if record is None or str(record.get("depends")) != depends:
        return None
    return {k: (v.item() if v.ndim == 0 and k != "depends" else v) for k, v in record.items()}


def _save_record(path: Path, record: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **{k: np.asarray(v) for k, v in record.items()})

    cache.atomic_write(path, write)


ARRAY_FIELDS = ("hist", "trajectories", "distribution_sample", "depends")


def _assemble(records, plan, meta, sampling, units, lo, hi) -> Trajectory:
    scalar = [{k: v for k, v in r.items() if k not in ARRAY_FIELDS and np.ndim(v) == 0} for r in records]
    table = pd.DataFrame(scalar)
    table["prev_step"] = table["prev_step"].astype(int)
    table["step"] = table["step"].astype(int)
    stack = lambda key: np.stack([np.asarray(r[key], dtype=np.float64) for r in records])  # noqa: E731
    unit_trajectory = None
    if units is not None:
        final = records[-1]
        unit_trajectory = UnitTrajectory(
            axis=units.axis,
            length=units.length,
            sample_size=len(units.positions),
            stats={
                name: np.stack([np.asarray(r[f"unit_{name}"], dtype=np.float64) for r in records])
                for name in UNIT_STATS
            },
            final_split=pd.DataFrame({name: final[f"split_{name}"] for name in SPLIT_FIELDS}),
            featured=int(meta["featured_unit"]),
            featured_edges=np.asarray(meta["featured_edges"], dtype=np.float64),
            featured_hist=stack("featured_hist"),
            featured_values=stack("featured_values"),
            featured_positions=np.asarray(meta["featured_positions"], dtype=np.int64),
        )
    return Trajectory(
        tensor=plan.tensor,
        shape=tuple(meta["shape"]),
        n=sampling.n,
        table=table,
        hist_edges=np.linspace(lo, hi, plan.histogram_bins + 1),
        hist=stack("hist"),
        trajectories=stack("trajectories"),
        trajectory_indices=sampling.trajectories,
        distribution_sample=stack("distribution_sample"),
        meta={**meta, "reference_step": plan.reference_step},
        units=unit_trajectory,
    )
