"""The statistics kernel: one step's numbers from its tensor, the reference and the previous step.

Pure tensor math, no files: the seeded samples, the unit layout, the fused chunked pass (pooled, or per
unit), the fine histogram and the quantiles read off it, and the per-unit dips.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from garden.dip import dip_pvalues, dips_and_cuts
from garden.extract.plan import DIP_THREADS, ExtractionPlan

Blocks = list[tuple[int, int]]


class Sampling:
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
        """[units, sample] in the stored dtype: each unit's entries at the sampled positions (on the
        tensor's device: a live monitor's weights may be on a GPU)."""
        positions = self._positions_t.to(tensor.device)
        if self.axis == 1:
            return tensor.index_select(0, positions).t().contiguous()
        return tensor.index_select(1, positions).contiguous()

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


def pass_blocks(shape: tuple[int, ...], chunk_size: int, units: UnitLayout | None) -> tuple[Blocks, int]:
    """(start, stop) of the blocks of the pass over a tensor of this shape, and the largest block's size:
    flat chunks, or whole rows when units are on."""
    if units is None:
        n = int(np.prod(shape))
        width = min(chunk_size, n)
        return [(s, min(s + width, n)) for s in range(0, n, width)], width
    rows, cols = shape
    per = max(1, chunk_size // cols)
    return [(s, min(s + per, rows)) for s in range(0, rows, per)], per * cols


def _histogram(flat: torch.Tensor, blocks: Blocks, cols: int, lo: float, hi: float, space: Workspace):
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


def step_statistics(x: torch.Tensor, ref: torch.Tensor | None, prev: torch.Tensor | None, lo: float,
                    hi: float, fine_bins: int, chunk_size: int, workspace: Workspace | None = None,
                    units: UnitLayout | None = None, cuts: np.ndarray | None = None) -> dict:  # fmt: skip
    """Fused blocked pass: power sums about a shift, distances, extremes, fine histogram; per unit too.

    Without units, `x` is flat and the moments are taken about one shift (the first block's mean); with
    units, `x` is the 2-D tensor, each unit's sums are taken about its own shift (axis 1: the first
    block's column means; axis 0: each row's own mean, every row lying in one block), and the pooled
    moments are combined from the units' exactly. Block sums are float32, their accumulation float64, and
    central moments are formed in float64, which keeps them exact when |mean| >> std. Values outside
    [lo, hi] are counted in the end bins. With `cuts` (one per unit), each unit's two groups (entries at
    or below its cut, and above) are counted and summed in the same pass.
    """
    blocks, width = pass_blocks(tuple(x.shape), chunk_size, units)
    device = workspace.device if workspace is not None else torch.device("cpu")
    fits = workspace is not None and workspace.chunk.numel() >= width and workspace.hist.numel() == fine_bins
    space = workspace if fits else Workspace(width, fine_bins, device)
    try:
        if units is None:
            return pooled_statistics(x, ref, prev, lo, hi, blocks, space)
        return unit_statistics(x, ref, prev, lo, hi, blocks, space, units, cuts)
    finally:
        if space is not workspace:
            space.close()


def _add_squared_distance(into: torch.Tensor, c: torch.Tensor, other: torch.Tensor, start: int, stop: int,
                          tmp: torch.Tensor) -> None:  # fmt: skip
    """Add the block's squared distance to the same block of `other` (the reference or previous step)."""
    torch.sub(c, other[start:stop].reshape(-1).to(c.device, non_blocking=True), out=tmp)
    into += torch.dot(tmp, tmp)


def _pass_summary(values: list[float], n: int, ref, prev, hist: torch.Tensor) -> dict:
    """What both passes report alike, from [squared distance to ref, to prev, min, max] (float64 sums)."""
    sq_ref, sq_prev, vmin, vmax = values
    return {
        "min": vmin,
        "max": vmax,
        "msd": sq_ref / n if ref is not None else float("nan"),
        "step_msd": sq_prev / n if prev is not None else float("nan"),
        "fine_hist": hist.cpu().numpy().astype(np.float64),
    }


def pooled_statistics(x: torch.Tensor, ref, prev, lo: float, hi: float, blocks: Blocks,
                      space: Workspace) -> dict:  # fmt: skip
    """The pass over a flat tensor: moments about one shift (the first block's mean), on the grid of the
    stored dtype. On the CPU the six sums of a block are one compiled loop (`garden.extract.fused`),
    elsewhere torch's ops."""
    flat = x.reshape(-1)
    histogram = space.helper.submit(_histogram, flat, blocks, 1, lo, hi, space)
    ref_flat = None if ref is None else ref.reshape(-1)
    prev_flat = None if prev is None else prev.reshape(-1)
    if space.device.type == "cpu":
        sums, shift = _cpu_sums(flat, ref_flat, prev_flat, blocks, space, x.dtype)
    else:
        sums, shift = _torch_sums(flat, ref_flat, prev_flat, blocks, space, x.dtype)
    hist, vmin, vmax = histogram.result()
    values = [*sums, *torch.stack([vmin, vmax]).double().cpu().tolist()]
    n = x.numel()
    out = _pass_summary(values[4:], n, ref, prev, hist)
    mu1, e2, e3, e4 = (v / n for v in values[:4])
    m2 = max(e2 - mu1**2, 0.0)
    m3 = e3 - 3 * mu1 * e2 + 2 * mu1**3
    m4 = e4 - 4 * mu1 * e3 + 6 * mu1**2 * e2 - 3 * mu1**4
    out.update(_shape_of(shift + mu1, m2, m3, m4))
    out["rms"] = max(e2 + 2 * shift * mu1 + shift**2, 0.0) ** 0.5
    return out


def _float32_block(values: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """A block as float32 (the stored block itself when it is float32 already, else converted into
    `buffer`)."""
    values = values.detach()  # (a live monitor's parameters)
    if values.dtype == torch.float32 and values.is_contiguous():
        return values
    out = buffer[: values.numel()]
    out.copy_(values)
    return out


def _cpu_sums(flat, ref_flat, prev_flat, blocks: Blocks, space: Workspace,
              stored: torch.dtype) -> tuple[list[float], float]:  # fmt: skip
    """[s1..s4 about the shift, squared distance to ref, to prev] (float64) and the shift, one compiled
    loop per block."""
    from garden.extract.fused import add_block_sums

    sums = np.zeros(6)
    shift = None
    for start, stop in blocks:
        block = _float32_block(flat[start:stop], space.chunk)
        if shift is None:
            shift = float(_on_grid(block.mean(), stored))
        ref = block if ref_flat is None else _float32_block(ref_flat[start:stop], space.work)
        prev = block if prev_flat is None else _float32_block(prev_flat[start:stop], space.work2)
        add_block_sums(block.numpy(), ref.numpy(), prev.numpy(), shift, sums)
    if ref_flat is None:
        sums[4] = 0.0
    if prev_flat is None:
        sums[5] = 0.0
    return sums.tolist(), shift


def _torch_sums(flat, ref_flat, prev_flat, blocks: Blocks, space: Workspace,
                stored: torch.dtype) -> tuple[list[float], float]:  # fmt: skip
    """The same sums by torch's ops on the workspace's device: float32 block sums accumulated in float64."""
    # s1..s4 about the shift, squared distances to the reference and to the previous step.
    sums = torch.zeros(6, dtype=torch.float64, device=space.device)
    shift = None
    for start, stop in blocks:
        size = stop - start
        c, tmp = space.chunk[:size], space.work[:size]
        c.copy_(flat[start:stop].reshape(-1), non_blocking=True)
        if ref_flat is not None:
            _add_squared_distance(sums[4], c, ref_flat, start, stop, tmp)
        if prev_flat is not None:
            _add_squared_distance(sums[5], c, prev_flat, start, stop, tmp)
        if shift is None:
            shift = _on_grid(c.mean(), stored)
        c.sub_(shift)
        sums[0] += c.sum()
        torch.mul(c, c, out=tmp)
        sums[1] += tmp.sum()
        sums[2] += torch.dot(tmp, c)
        sums[3] += torch.dot(tmp, tmp)
    return sums.cpu().tolist(), float(shift)


class _UnitSums:
    """Per-unit float64 accumulators of one pass over a 2-D tensor: power sums 1..4 about each unit's
    shift, squared distances to the reference, and with cuts each unit's lower group (count and sum)."""

    def __init__(self, units: UnitLayout, cols: int, device: torch.device, cuts: np.ndarray | None):
        f64 = dict(dtype=torch.float64, device=device)
        self.axis, self.cols = units.axis, cols
        self.power = torch.zeros(4, units.n_units, **f64)
        self.sq_ref = torch.zeros(units.n_units, **f64)
        self.shift = torch.zeros(units.n_units, **f64)
        self.cut = None if cuts is None else torch.as_tensor(cuts, dtype=torch.float32, device=device)
        self.low = None if cuts is None else torch.zeros(2, units.n_units, **f64)

    def add(self, values: torch.Tensor, into: torch.Tensor, start: int, stop: int,
            exact: bool = False) -> None:  # fmt: skip
        """Add a block's per-unit sums into float64 accumulators: float32 within the block (torch sums
        pairwise), or float64 throughout where `exact` (the first power, which gives the mean: a mean near 0
        needs it to be exact relative to itself)."""
        block = values.view(-1, self.cols)
        dtype = torch.float64 if exact else None
        if self.axis == 1:
            into += block.sum(0, dtype=dtype)
        else:
            into[start:stop] += block.sum(1, dtype=dtype)

    def add_split(self, c: torch.Tensor, tmp2: torch.Tensor, start: int, stop: int) -> None:
        """Count and sum each unit's entries at or below its cut."""
        block = c.view(-1, self.cols)
        below = block <= (self.cut[None, :] if self.axis == 1 else self.cut[start:stop, None])
        self.add(below.view(-1), self.low[0], start, stop, exact=True)
        torch.mul(c, below.view(-1), out=tmp2)
        self.add(tmp2, self.low[1], start, stop, exact=True)

    def add_powers(self, c, tmp, tmp2, start: int, stop: int, stored: torch.dtype) -> None:
        """Power sums 1..4 of each unit's values about its shift, from one block (c is overwritten)."""
        block = c.view(-1, self.cols)
        if self.axis == 1:
            if start == 0:
                self.shift.copy_(_on_grid(block.mean(0), stored))
            block.sub_(self.shift.to(block.dtype))
        else:
            row_means = _on_grid(block.mean(1), stored)
            self.shift[start:stop] = row_means
            block.sub_(row_means[:, None])
        self.add(c, self.power[0], start, stop, exact=True)
        torch.mul(c, c, out=tmp)
        self.add(tmp, self.power[1], start, stop)
        torch.mul(tmp, c, out=tmp2)
        self.add(tmp2, self.power[2], start, stop)
        tmp.mul_(tmp)
        self.add(tmp, self.power[3], start, stop)


def unit_statistics(x: torch.Tensor, ref, prev, lo: float, hi: float, blocks: Blocks, space: Workspace,
                    units: UnitLayout, cuts: np.ndarray | None) -> dict:  # fmt: skip
    """The pass over a 2-D tensor in whole rows: each unit's moments, distance to the reference and (with
    `cuts`) two groups; the pooled moments combined from the units'."""
    # Squared distances to the reference (the units' summed after the pass) and to the previous step.
    distances = torch.zeros(2, dtype=torch.float64, device=space.device)
    cols = x.shape[1]
    histogram = space.helper.submit(_histogram, x, blocks, cols, lo, hi, space)
    sums = _UnitSums(units, cols, space.device, cuts)
    for start, stop in blocks:
        size = (stop - start) * cols
        c, tmp, tmp2 = space.chunk[:size], space.work[:size], space.work2[:size]
        c.copy_(x[start:stop].reshape(-1), non_blocking=True)
        if ref is not None:
            torch.sub(c, ref[start:stop].reshape(-1).to(space.device, non_blocking=True), out=tmp)
            tmp.mul_(tmp)
            sums.add(tmp, sums.sq_ref, start, stop)
        if prev is not None:
            _add_squared_distance(distances[1], c, prev, start, stop, tmp)
        if sums.low is not None:
            sums.add_split(c, tmp2, start, stop)
        sums.add_powers(c, tmp, tmp2, start, stop, x.dtype)
    if ref is not None:
        distances[0] = sums.sq_ref.sum()
    hist, vmin, vmax = histogram.result()
    values = torch.cat([distances, torch.stack([vmin, vmax]).double()]).cpu().tolist()
    out = _pass_summary(values, x.numel(), ref, prev, hist)
    length = units.length
    means, m2, m3, m4 = _unit_moments(sums, length)
    unit = _shape_of(means, m2, m3, m4)
    unit["msd"] = sums.sq_ref.cpu().numpy() / length if ref is not None else np.full(len(means), np.nan)
    out.update(_pooled_from_units(means, m2, m3, m4))
    if sums.low is not None:
        unit["split"] = _unit_split(sums.low, cuts, means, length)
    out["units"] = unit
    return out


def _unit_moments(sums: _UnitSums, length: int) -> tuple[np.ndarray, ...]:
    """Per unit: the mean and central moments 2..4 from the power sums about each unit's shift (float64)."""
    s = sums.power.cpu().numpy() / length
    mu1 = s[0]
    m2 = np.maximum(s[1] - mu1**2, 0.0)
    m3 = s[2] - 3 * mu1 * s[1] + 2 * mu1**3
    m4 = s[3] - 4 * mu1 * s[2] + 6 * mu1**2 * s[1] - 3 * mu1**4
    means = sums.shift.cpu().numpy() + mu1
    return means, m2, m3, m4


def _pooled_from_units(means: np.ndarray, m2: np.ndarray, m3: np.ndarray, m4: np.ndarray) -> dict:
    """Pooled moments: each unit's about the pooled mean (parallel-axis terms), summed."""
    mean = float(means.mean())
    delta = means - mean
    p2 = float(np.mean(m2 + delta**2))
    p3 = float(np.mean(m3 + 3 * delta * m2 + delta**3))
    p4 = float(np.mean(m4 + 4 * delta * m3 + 6 * delta**2 * m2 + delta**4))
    pooled = _shape_of(mean, p2, p3, p4)
    pooled["rms"] = (p2 + mean**2) ** 0.5
    return pooled


def _unit_split(low: torch.Tensor, cuts: np.ndarray, means: np.ndarray, length: int) -> dict:
    """Each unit's two groups: entries at or below its cut, and above (sizes and means)."""
    low_count, low_sum = low.cpu().numpy()
    high_count = length - low_count
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "cut": np.asarray(cuts, dtype=np.float64),
            "low_count": low_count,
            "low_mean": low_sum / low_count,
            "high_count": high_count,
            "high_mean": (means * length - low_sum) / high_count,
        }


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


def _on_grid(shift: torch.Tensor, stored: torch.dtype) -> torch.Tensor:
    """A shift rounded to the stored dtype when it is a 16-bit float: the difference of two such values
    is exact in float32 (for weights of |value| < 1), so moments about it lose no bits even when
    |mean| >> std. Float32 data keeps the float32 shift."""
    if stored in (torch.float16, torch.bfloat16):
        return shift.to(stored).float()
    return shift


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
    """Every unit's dip statistic and two-means cut on its seeded sample (see `garden.dip`: a CPU kernel,
    so only the samples come to the host)."""
    return dips_and_cuts(units.samples(tensor).cpu(), threads=DIP_THREADS)


def with_dips(record: dict, units: UnitLayout, dips: np.ndarray) -> dict:
    """A step's record completed with its units' dips and their p-values."""
    record["unit_dip"] = dips
    record["unit_dip_pvalue"] = dip_pvalues(len(units.positions), dips)
    return record
