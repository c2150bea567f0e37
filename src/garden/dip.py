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
    """Compile (once per process, cached on disk by numba) and return the batch kernels."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = _build()
    return _COMPILED


_COMPILED = None


def _build():
    import numba

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def dip_of_sorted(x, mn, mj, gcm, lcm):  # pragma: no cover - compiled
        """The dip of one ascending sample (1-based work arrays of length n + 2, as in AS 217)."""
        n = x.shape[0]
        if n < 2 or x[n - 1] == x[0]:
            return 0.0
        # Indices over which the greatest convex minorant (mn) and least concave majorant (mj) combine.
        mn[1] = 1
        for j in range(2, n + 1):
            mn[j] = j - 1
            while True:
                a = mn[j]
                b = mn[a]
                if a == 1 or (x[j - 1] - x[a - 1]) * (a - b) < (x[a - 1] - x[b - 1]) * (j - a):
                    break
                mn[j] = b
        mj[n] = n
        for k in range(n - 1, 0, -1):
            mj[k] = k + 1
            while True:
                a = mj[k]
                b = mj[a]
                if a == n or (x[k - 1] - x[a - 1]) * (a - b) < (x[a - 1] - x[b - 1]) * (k - a):
                    break
                mj[k] = b
        low, high = 1, n
        dip = 0.0
        while True:
            # Change points of the GCM from high down to low, and of the LCM from low up to high.
            gcm[1] = high
            i = 1
            while gcm[i] > low:
                gcm[i + 1] = mn[gcm[i]]
                i += 1
            l_gcm = i
            ig = l_gcm
            ix = ig - 1
            lcm[1] = low
            i = 1
            while lcm[i] < high:
                lcm[i + 1] = mj[lcm[i]]
                i += 1
            l_lcm = i
            ih = l_lcm
            iv = 2
            # The largest distance between the GCM and the LCM from low to high.
            d = 0.0
            if l_gcm != 2 or l_lcm != 2:
                while True:
                    gx = gcm[ix]
                    lv = lcm[iv]
                    if gx > lv:
                        g1 = gcm[ix + 1]
                        dx = (lv - g1 + 1) - (x[lv - 1] - x[g1 - 1]) * (gx - g1) / (x[gx - 1] - x[g1 - 1])
                        iv += 1
                        if dx >= d:
                            d = dx
                            ig = ix + 1
                            ih = iv - 1
                    else:
                        l1 = lcm[iv - 1]
                        dx = (x[gx - 1] - x[l1 - 1]) * (lv - l1) / (x[lv - 1] - x[l1 - 1]) - (gx - l1 - 1)
                        ix -= 1
                        if dx >= d:
                            d = dx
                            ig = ix + 1
                            ih = iv
                    if ix < 1:
                        ix = 1
                    if iv > l_lcm:
                        iv = l_lcm
                    if gcm[ix] == lcm[iv]:
                        break
            if d < dip:
                break
            # The dips of the convex minorant and of the concave majorant on [low, high].
            dip_l = 0.0
            for j in range(ig, l_gcm):
                best = 1.0
                jb = gcm[j + 1]
                je = gcm[j]
                if je - jb > 1 and x[je - 1] != x[jb - 1]:
                    slope = (je - jb) / (x[je - 1] - x[jb - 1])
                    base = x[jb - 1]
                    for jj in range(jb, je + 1):
                        t = (jj - jb + 1) - (x[jj - 1] - base) * slope
                        if t > best:
                            best = t
                if best > dip_l:
                    dip_l = best
            dip_u = 0.0
            for k in range(ih, l_lcm):
                best = 1.0
                kb = lcm[k]
                ke = lcm[k + 1]
                if ke - kb > 1 and x[ke - 1] != x[kb - 1]:
                    slope = (ke - kb) / (x[ke - 1] - x[kb - 1])
                    base = x[kb - 1]
                    for kk in range(kb, ke + 1):
                        t = (x[kk - 1] - base) * slope - (kk - kb - 1)
                        if t > best:
                            best = t
                if best > dip_u:
                    dip_u = best
            new = dip_l if dip_l > dip_u else dip_u
            if new > dip:
                dip = new
            if low == gcm[ig] and high == lcm[ih]:
                break
            low = gcm[ig]
            high = lcm[ih]
        return dip / (2 * n)

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def sort_float32(bits, keys, spare, counts):  # pragma: no cover - compiled
        """Ascending LSD radix sort (8-bit digits) of float32 values given as their uint32 bits, in
        place. Keys flip the sign bit of positives and every bit of negatives, so that unsigned order is
        float order; a digit that all keys share (the low mantissa bits of values that came from fp16 or
        bf16) costs one counting pass and no scatter."""
        n = bits.shape[0]
        for i in range(n):
            b = bits[i]
            keys[i] = b ^ np.uint32(0xFFFFFFFF) if b & np.uint32(0x80000000) else b | np.uint32(0x80000000)
        src, dst = keys, spare
        for shift in range(0, 32, 8):
            counts[:] = 0
            for i in range(n):
                counts[(src[i] >> shift) & 0xFF] += 1
            if counts.max() == n:
                continue
            total = 0
            for d in range(256):
                c = counts[d]
                counts[d] = total
                total += c
            for i in range(n):
                d = (src[i] >> shift) & 0xFF
                dst[counts[d]] = src[i]
                counts[d] += 1
            src, dst = dst, src
        for i in range(n):
            k = src[i]
            bits[i] = k ^ np.uint32(0x80000000) if k & np.uint32(0x80000000) else k ^ np.uint32(0xFFFFFFFF)

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def dips_and_splits(rows, dips, cuts):  # pragma: no cover - compiled
        """Per row (float32 values as uint32 bits, any order; sorted here in place): the dip, and the
        two-means cut (midpoint between the groups)."""
        m, n = rows.shape
        x = np.empty(n, np.float64)
        keys = np.empty(n, np.uint32)
        spare = np.empty(n, np.uint32)
        counts = np.empty(256, np.int64)
        mn = np.empty(n + 2, np.int64)
        mj = np.empty(n + 2, np.int64)
        gcm = np.empty(n + 2, np.int64)
        lcm = np.empty(n + 2, np.int64)
        for r in range(m):
            row = rows[r]
            sort_float32(row, keys, spare, counts)
            values = row.view(np.float32)
            total = 0.0
            for i in range(n):
                x[i] = values[i]
                total += x[i]
            dips[r] = dip_of_sorted(x, mn, mj, gcm, lcm)
            # Between-group variance of the split after k entries: k (n - k) (mean_low - mean_high)^2.
            best, best_k, low_sum = -1.0, 1, 0.0
            for k in range(1, n):
                low_sum += x[k - 1]
                if x[k] == x[k - 1]:
                    continue  # never split tied values
                gap = low_sum / k - (total - low_sum) / (n - k)
                score = k * (n - k) * gap * gap
                if score > best:
                    best, best_k = score, k
            cuts[r] = 0.5 * (x[best_k - 1] + x[best_k]) if best >= 0 else x[n - 1]

    return dips_and_splits


def dips_and_cuts(samples: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Dip statistic and two-means cut of every row of `samples` (any order; sorted here).

    The kernel (radix sort, dip, split) runs in `threads` threads over slices of the rows, with the GIL
    released, so the caller's other threads keep running.
    """
    kernel = _kernels()
    rows = np.array(samples, dtype=np.float32, order="C").view(np.uint32)  # a copy: sorted in place
    dips = np.empty(len(rows), dtype=np.float64)
    cuts = np.empty(len(rows), dtype=np.float64)

    def work(start: int, stop: int) -> None:
        kernel(rows[start:stop], dips[start:stop], cuts[start:stop])

    bounds = np.linspace(0, len(rows), max(1, min(threads, len(rows))) + 1).astype(int)
    if len(bounds) == 2:
        work(0, len(rows))
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(bounds) - 1) as pool:
            list(pool.map(work, bounds[:-1], bounds[1:]))
    return dips, cuts


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
