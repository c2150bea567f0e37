"""The plan of an extraction: which tensor and steps, the settings every recorded number depends on (and
so the cache key), and what makes a step unusable (`BadStep`)."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields

import torch

from garden import cache
from garden.errors import GardenError
from garden.settings.schema import ExtractSettings

EXCLUDE_HINT = " (set series.on_bad_step=exclude to drop such steps with a warning, recorded in the run)"
UNIT_STATS = ("mean", "std", "skewness", "kurtosis", "msd", "dip", "dip_pvalue")
SPLIT_FIELDS = ("cut", "low_count", "low_mean", "high_count", "high_mean")
# Threads the dip kernel uses for one checkpoint's units (it runs beside the streaming pass).
DIP_THREADS = 2


class BadStep(GardenError):
    """A checkpoint whose tensor cannot be analysed: a wrong shape or non-finite values."""

    def __init__(self, step: int, reason: str, hint: str = ""):
        super().__init__(f"step {step}: {reason}{hint}")
        self.step, self.reason = step, reason


def _default(name: str) -> object:
    """The schema's default of `extract.<name>` (garden.settings.schema: each default written once)."""
    spec = {f.name: f for f in fields(ExtractSettings)}[name]
    return spec.default_factory() if spec.default is MISSING else spec.default


@dataclass(frozen=True)
class ExtractionPlan:
    """What to extract: the tensor, the steps, and the settings every recorded number depends on."""

    tensor: str
    steps: tuple[int, ...]
    reference_step: int
    subsample: int | None = _default("subsample")
    n_trajectories: int = _default("n_trajectories")
    n_distribution_sample: int = _default("n_distribution_sample")
    histogram_bins: int = _default("histogram_bins")
    quantile_bins: int = _default("quantile_bins")
    quantiles: tuple[float, ...] = tuple(_default("quantiles"))
    histogram_range: float | None = _default("histogram_range")
    chunk_size: int = _default("chunk_size")
    seed: int = _default("seed")
    unit_axis: str | int | None = _default("unit_axis")
    unit_sample: int = _default("unit_sample")
    # What a step with a wrong shape or non-finite values does: error (the job fails naming it) | exclude
    # (dropped with a warning, recorded in the trajectory's meta). Not part of the cache key.
    on_bad_step: str = "error"

    @classmethod
    def from_settings(cls, extract: ExtractSettings, tensor: str, steps: list[int],
                      on_bad_step: str = "error") -> ExtractionPlan:  # fmt: skip
        """The plan of a job's `extract` settings (checked by the schema) for a tensor and its steps."""
        shared = {f.name: getattr(extract, f.name) for f in fields(ExtractSettings)}
        reference = shared.pop("reference_step")
        reference_step = steps[0] if reference is None else reference
        return cls(tensor=tensor, steps=tuple(steps), reference_step=reference_step, on_bad_step=on_bad_step,
                   **shared)  # fmt: skip

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


def check_shape(tensor: torch.Tensor, shape, plan: ExtractionPlan, step: int,
                hint: str = EXCLUDE_HINT) -> None:  # fmt: skip
    """Every step must have the reference step's shape."""
    if list(tensor.shape) != list(shape):
        raise BadStep(step, f"{plan.tensor} has shape {list(tensor.shape)}, the reference step "
                            f"{plan.reference_step} has {list(shape)}", hint)  # fmt: skip


def extent(tensor: torch.Tensor) -> float:
    """The largest |value| of a tensor, NaN or inf where it holds one: one min/max pass (torch's aminmax
    is vectorised for 16-bit floats, where isfinite().all() and abs().max() are 10-40x slower)."""
    if tensor.numel() == 0:
        return 0.0
    low, high = torch.aminmax(tensor)
    return float(torch.maximum(-low, high))  # (NaN propagates through both)


def check_finite(tensor: torch.Tensor, plan: ExtractionPlan, step: int, role: str) -> float:
    """The reference and final steps fix the shared histogram range: they are checked before the pass
    and cannot be excluded. Returns the tensor's `extent`."""
    found = extent(tensor)
    if not math.isfinite(found):
        raise BadStep(step, f"{plan.tensor} holds non-finite values (NaN or inf) at the {role} step, "
                            "which every other step is measured against; select other steps")  # fmt: skip
    return found
