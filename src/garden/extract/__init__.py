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

The layers, each importing only those above it:
- `plan`: what to extract (`ExtractionPlan`: settings, unit axis, cache key) and what makes a step bad;
- `kernel`: the tensor math of one step (pooled and per-unit statistics, histogram, quantiles, dips);
- `records`: the record files (meta, final units, per-step records) and the Trajectory built from them;
- `stream`: the loop over the steps (`extract`): reuse, compute, exclude, prefetch, dips in the
  background, progress.
"""

from garden.extract.kernel import UnitLayout, Workspace, histogram_quantiles, step_statistics, unit_dips
from garden.extract.plan import BadStep, ExtractionPlan
from garden.extract.records import quantile_column
from garden.extract.stream import extract

__all__ = [
    "BadStep",
    "ExtractionPlan",
    "UnitLayout",
    "Workspace",
    "extract",
    "histogram_quantiles",
    "quantile_column",
    "step_statistics",
    "unit_dips",
]
