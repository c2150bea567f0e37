"""The pooled pass's sums on the CPU, compiled (numba, cached on disk after the first compilation): the
six sums of a block in one read of it, where torch needs ten passes (copies, differences, products and
reductions) over the block and its reference and predecessor. Imported only when a pooled pass runs on
the CPU: numba loads in ~0.5 s.
"""

import numpy as np
from numba import njit


# `reassoc` lets the additions run in SIMD lanes (the sums are reordered, not rounded coarser: every term
# is taken to float64 first); NaN and inf still propagate, for the step's check to find.
@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"}, boundscheck=False)
def add_block_sums(block, ref, prev, shift, sums):
    """Add to `sums` (float64 [6]) a float32 block's power sums 1..4 about `shift` and its squared
    distances to the same block of the reference and of the previous step, in float64."""
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    s4 = 0.0
    to_ref = 0.0
    to_prev = 0.0
    for k in range(block.shape[0]):
        value = np.float64(block[k])
        d = value - ref[k]
        to_ref += d * d
        d = value - prev[k]
        to_prev += d * d
        c = value - shift
        c2 = c * c
        s1 += c
        s2 += c2
        s3 += c2 * c
        s4 += c2 * c2
    sums[0] += s1
    sums[1] += s2
    sums[2] += s3
    sums[3] += s4
    sums[4] += to_ref
    sums[5] += to_prev
