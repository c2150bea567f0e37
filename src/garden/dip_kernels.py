"""The compiled kernels of `garden.dip` (numba, cached on disk after the first compilation).

Module-level functions, so that numba's on-disk cache finds them again in every process. Imported only
when dips are computed: numba loads in ~0.5 s.
"""

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, boundscheck=False)
def _hull_links(x, mn, mj):
    """For each index, the previous point of the greatest convex minorant (mn) and the next point of the
    least concave majorant (mj) of the points before (after) it."""
    n = x.shape[0]
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


@njit(cache=True, nogil=True, boundscheck=False)
def _change_points(low, high, mn, mj, gcm, lcm):
    """The GCM's change points from high down to low, the LCM's from low up to high; their counts."""
    gcm[1] = high
    i = 1
    while gcm[i] > low:
        gcm[i + 1] = mn[gcm[i]]
        i += 1
    l_gcm = i
    lcm[1] = low
    i = 1
    while lcm[i] < high:
        lcm[i + 1] = mj[lcm[i]]
        i += 1
    return l_gcm, i


@njit(cache=True, nogil=True, boundscheck=False)
def _widest_gap(x, gcm, l_gcm, lcm, l_lcm):
    """The largest distance between the GCM and the LCM on [low, high], and where it is (ig, ih)."""
    ig, ih = l_gcm, l_lcm
    ix, iv = l_gcm - 1, 2
    d = 0.0
    if l_gcm == 2 and l_lcm == 2:
        return d, ig, ih
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
            return d, ig, ih


@njit(cache=True, nogil=True, boundscheck=False)
def _hull_dip(x, points, first, count, concave):
    """The largest distance of the sample to one hull (the convex minorant's change points, or with
    `concave` the concave majorant's) over its segments from `first` on."""
    dip = 0.0
    for j in range(first, count):
        best = 1.0
        start, stop = (points[j], points[j + 1]) if concave else (points[j + 1], points[j])
        if stop - start > 1 and x[stop - 1] != x[start - 1]:
            slope = (stop - start) / (x[stop - 1] - x[start - 1])
            base = x[start - 1]
            for k in range(start, stop + 1):
                if concave:
                    t = (x[k - 1] - base) * slope - (k - start - 1)
                else:
                    t = (k - start + 1) - (x[k - 1] - base) * slope
                if t > best:
                    best = t
        if best > dip:
            dip = best
    return dip


@njit(cache=True, nogil=True, boundscheck=False)
def dip_of_sorted(x, mn, mj, gcm, lcm):
    """The dip of one ascending sample (1-based work arrays of length n + 2, as in AS 217)."""
    n = x.shape[0]
    if n < 2 or x[n - 1] == x[0]:
        return 0.0
    _hull_links(x, mn, mj)
    low, high = 1, n
    dip = 0.0
    while True:
        l_gcm, l_lcm = _change_points(low, high, mn, mj, gcm, lcm)
        d, ig, ih = _widest_gap(x, gcm, l_gcm, lcm, l_lcm)
        if d < dip:
            break
        dip_l = _hull_dip(x, gcm, ig, l_gcm, False)
        dip_u = _hull_dip(x, lcm, ih, l_lcm, True)
        new = dip_l if dip_l > dip_u else dip_u
        if new > dip:
            dip = new
        if low == gcm[ig] and high == lcm[ih]:
            break
        low = gcm[ig]
        high = lcm[ih]
    return dip / (2 * n)


@njit(cache=True, nogil=True, boundscheck=False)
def radix_sort(keys, spare, counts, bits):
    """Ascending LSD radix sort (8-bit digits) of unsigned keys of `bits` bits; returns the array
    that holds the result. A digit that all keys share (the low mantissa bits of values that came
    from 16-bit floats) costs one counting pass and no scatter."""
    n = keys.shape[0]
    src, dst = keys, spare
    for shift in range(0, bits, 8):
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
    return src


@njit(cache=True, nogil=True, boundscheck=False)
def dip_and_cut(x, mn, mj, gcm, lcm):
    """The dip of an ascending sample and its two-means cut (the midpoint between the two groups
    whose split maximises the between-group variance k (n - k) (mean_low - mean_high)^2)."""
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        total += x[i]
    best, best_k, low_sum = -1.0, 1, 0.0
    for k in range(1, n):
        low_sum += x[k - 1]
        if x[k] == x[k - 1]:
            continue  # never split tied values
        gap = low_sum / k - (total - low_sum) / (n - k)
        score = k * (n - k) * gap * gap
        if score > best:
            best, best_k = score, k
    cut = 0.5 * (x[best_k - 1] + x[best_k]) if best >= 0 else x[n - 1]
    return dip_of_sorted(x, mn, mj, gcm, lcm), cut


@njit(cache=True, nogil=True, boundscheck=False)
def rows_float32(rows, dips, cuts):
    """Per row of float32 values (given as their uint32 bits, any order): the dip and the cut."""
    m, n = rows.shape
    x = np.empty(n, np.float64)
    keys = np.empty(n, np.uint32)
    spare = np.empty(n, np.uint32)
    back = np.empty(n, np.uint32)
    as_float = back.view(np.float32)
    counts = np.empty(256, np.int64)
    mn, mj = np.empty(n + 2, np.int64), np.empty(n + 2, np.int64)
    gcm, lcm = np.empty(n + 2, np.int64), np.empty(n + 2, np.int64)
    sign = np.uint32(0x80000000)
    for r in range(m):
        for i in range(n):  # unsigned order = float order: flip the sign bit, or every bit if negative
            b = rows[r, i]
            keys[i] = b ^ np.uint32(0xFFFFFFFF) if b & sign else b | sign
        ordered = radix_sort(keys, spare, counts, 32)
        for i in range(n):
            k = ordered[i]
            back[i] = k ^ sign if k & sign else k ^ np.uint32(0xFFFFFFFF)
            x[i] = as_float[i]
        dips[r], cuts[r] = dip_and_cut(x, mn, mj, gcm, lcm)


@njit(cache=True, nogil=True, boundscheck=False)
def rows_float16(rows, values, dips, cuts):
    """Per row of 16-bit floats (fp16 or bf16 bits, any order; `values` maps bits to value)."""
    m, n = rows.shape
    x = np.empty(n, np.float64)
    keys = np.empty(n, np.uint16)
    spare = np.empty(n, np.uint16)
    counts = np.empty(256, np.int64)
    mn, mj = np.empty(n + 2, np.int64), np.empty(n + 2, np.int64)
    gcm, lcm = np.empty(n + 2, np.int64), np.empty(n + 2, np.int64)
    sign = np.uint16(0x8000)
    for r in range(m):
        for i in range(n):
            b = rows[r, i]
            keys[i] = b ^ np.uint16(0xFFFF) if b & sign else b | sign
        ordered = radix_sort(keys, spare, counts, 16)
        for i in range(n):
            k = ordered[i]
            x[i] = values[k ^ sign if k & sign else k ^ np.uint16(0xFFFF)]
        dips[r], cuts[r] = dip_and_cut(x, mn, mj, gcm, lcm)
