"""Hartigan's dip for many units at once, in a kernel that runs beside the streaming pass.

The `diptest` package is the reference (the tests and `make bench` compare every value with it), but its
API takes one sample per call and holds the GIL for the whole call: the dips of a layer's 768 units at
one checkpoint (~80 ms of CPU for 4096 entries each) would then block the thread that reads and reduces
the next checkpoint. This module is the same algorithm (Hartigan & Hartigan 1985; P. M. Hartigan,
Applied Statistics AS 217, with Maechler's fixes as in R's and `diptest`'s C code: the same comparisons in
the same order, so the statistics are identical to the last bit) compiled by numba with the GIL released,
over a batch of sorted samples. P-values use `diptest`'s own table of critical values, interpolated on
sqrt(n) exactly as `diptest.diptest` does.

Each batch also gets its best split into two groups (the 1-D two-means split: the cut that maximises the
between-group variance), which the per-unit table reports at the final step.
"""

from __future__ import annotations

import numpy as np


def _kernels():
    """The batch kernels (`garden.dip_kernels`, imported on first use)."""
    from garden import dip_kernels

    return dip_kernels.rows_float32, dip_kernels.rows_float16


def _bits_and_values(samples):
    """Sample rows as raw bits for the kernels: 16-bit floats stay 16-bit (two radix passes, values
    through a table); anything else becomes float32 (exact for the dtypes checkpoints use)."""
    import torch

    if isinstance(samples, torch.Tensor):
        if samples.dtype in (torch.float16, torch.bfloat16):
            bits = samples.contiguous().view(torch.int16).numpy().view(np.uint16)
            return bits, _value_table("bf16" if samples.dtype == torch.bfloat16 else "fp16")
        samples = samples.float().numpy()
    if samples.dtype == np.float16:
        return np.ascontiguousarray(samples).view(np.uint16), _value_table("fp16")
    return np.ascontiguousarray(samples, dtype=np.float32).view(np.uint32), None


_TABLES: dict[str, np.ndarray] = {}


def _value_table(kind: str) -> np.ndarray:
    """float64 value of each of the 65536 bit patterns of fp16 or bf16 (bf16: the top half of a float32)."""
    if kind not in _TABLES:
        patterns = np.arange(1 << 16, dtype=np.uint32)
        with np.errstate(invalid="ignore"):  # the NaN patterns
            if kind == "fp16":
                _TABLES[kind] = patterns.astype(np.uint16).view(np.float16).astype(np.float64)
            else:
                _TABLES[kind] = (patterns << 16).view(np.float32).astype(np.float64)
    return _TABLES[kind]


# Below this many sample values per call, `diptest` itself (one call per unit, GIL held) costs less than
# loading the compiled kernels (~1.5 s per process for numba and LLVM): small layers never load them.
KERNEL_MIN_VALUES = 1 << 20


def dips_and_cuts(samples, threads: int = 1, kernel: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dip statistic and two-means cut of every row of `samples` ([units, n], any order; a numpy array
    or a torch tensor, 16-bit floats kept as they are).

    The kernel (radix sort, dip, split) runs in `threads` threads over slices of the rows, with the GIL
    released, so the caller's other threads keep running. `kernel=None` uses it from
    `KERNEL_MIN_VALUES` values on and `diptest` below; both give the same numbers.
    """
    size = int(np.prod(samples.shape))
    if not (kernel if kernel is not None else size >= KERNEL_MIN_VALUES):
        return _dips_and_cuts_by_diptest(samples)
    float32_kernel, float16_kernel = _kernels()
    bits, values = _bits_and_values(samples)
    dips = np.empty(len(bits), dtype=np.float64)
    cuts = np.empty(len(bits), dtype=np.float64)

    def work(start: int, stop: int) -> None:
        if values is None:
            float32_kernel(bits[start:stop], dips[start:stop], cuts[start:stop])
        else:
            float16_kernel(bits[start:stop], values, dips[start:stop], cuts[start:stop])

    bounds = np.linspace(0, len(bits), max(1, min(threads, len(bits))) + 1).astype(int)
    if len(bounds) == 2:
        work(0, len(bits))
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(bounds) - 1) as pool:
            list(pool.map(work, bounds[:-1], bounds[1:]))
    return dips, cuts


def _dips_and_cuts_by_diptest(samples) -> tuple[np.ndarray, np.ndarray]:
    """The same numbers from `diptest.dipstat` per row and the two-means cut in numpy."""
    import diptest
    import torch

    values = (
        samples.double().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples, np.float64)
    )
    ordered = np.sort(np.atleast_2d(values), axis=1)
    dips = np.array([diptest.dipstat(row, sort_x=False) for row in ordered])
    return dips, two_means_cuts(ordered)


def two_means_cuts(ordered: np.ndarray) -> np.ndarray:
    """Per ascending row: the midpoint between the two groups whose split (after k entries, never
    between tied values) maximises the between-group variance k (n - k) (mean_low - mean_high)^2."""
    m, n = ordered.shape
    if n < 2:
        return ordered[:, -1].copy()
    sums = np.cumsum(ordered, axis=1)
    k = np.arange(1, n)
    low_sum = sums[:, :-1]
    gap = low_sum / k - (sums[:, -1:] - low_sum) / (n - k)
    score = np.where(ordered[:, 1:] == ordered[:, :-1], -np.inf, k * (n - k) * gap * gap)
    best = np.argmax(score, axis=1)
    rows = np.arange(m)
    split = 0.5 * (ordered[rows, best] + ordered[rows, best + 1])
    return np.where(score[rows, best] >= 0, split, ordered[:, -1])


def dip_pvalues(n: int, dips: np.ndarray) -> np.ndarray:
    """P-values of dip statistics of samples of size n: `diptest`'s interpolation of its table of
    critical values on sqrt(n) (`Consts.compute_pval_interpolation`), vectorised over the dips."""
    from diptest.consts import Consts

    sizes, critical, alpha = Consts._SAMPLE_SIZE, Consts._CRIT_VALS, Consts._ALPHA
    position = int(sizes.searchsorted(n, side="left"))
    lower, upper = max(0, position - 1), min(position, critical.shape[0] - 1)
    n0, n1 = sizes[lower], sizes[upper]
    y0 = np.sqrt(n0) * critical[lower]
    xp = y0 if lower == upper else y0 + float(n - n0) / (n1 - n0) * (np.sqrt(n1) * critical[upper] - y0)
    return 1.0 - np.interp(np.sqrt(n) * np.asarray(dips, dtype=np.float64), xp, alpha)
