"""The plan of an extraction: which tensor and steps, the settings every recorded number depends on (and
so the cache key), and what makes a step unusable (`BadStep`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from garden import cache
from garden.errors import GardenError

BAD_STEP_POLICIES = ("error", "exclude")
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


def check_shape(tensor: torch.Tensor, shape, plan: ExtractionPlan, step: int,
                hint: str = EXCLUDE_HINT) -> None:  # fmt: skip
    """Every step must have the reference step's shape."""
    if list(tensor.shape) != list(shape):
        raise BadStep(step, f"{plan.tensor} has shape {list(tensor.shape)}, the reference step "
                            f"{plan.reference_step} has {list(shape)}", hint)  # fmt: skip


def check_finite(tensor: torch.Tensor, plan: ExtractionPlan, step: int, role: str) -> None:
    """The reference and final steps fix the shared histogram range: they are checked before the pass
    and cannot be excluded."""
    if not bool(torch.isfinite(tensor).all()):
        raise BadStep(step, f"{plan.tensor} holds non-finite values (NaN or inf) at the {role} step, "
                            "which every other step is measured against; select other steps")  # fmt: skip
