"""The record files of an extraction's cache folder, and the Trajectory assembled from them.

`meta.json` fixes what every step is measured on (shape, dtype, the shared histogram range, the unit
layout and the featured unit), `final_units.npz` the final step's dips and cuts, and `steps/step{N}.npz`
one step's statistics, each with the content it was computed from (`depends`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from garden import cache
from garden.extract.kernel import (
    Sampling,
    UnitLayout,
    Workspace,
    histogram_quantiles,
    step_statistics,
    unit_dips,
    with_dips,
)
from garden.extract.plan import (
    EXCLUDE_HINT,
    SPLIT_FIELDS,
    UNIT_STATS,
    BadStep,
    ExtractionPlan,
    check_finite,
    check_shape,
    extent,
)
from garden.series import CheckpointSeries
from garden.trajectory import Trajectory, UnitTrajectory

log = logging.getLogger("garden")
FINAL_UNITS = "final_units.npz"
ARRAY_FIELDS = ("hist", "trajectories", "distribution_sample", "depends")
Read = Callable[[int], torch.Tensor]


def quantile_column(q: float) -> str:
    return f"q{round(q * 100):02d}" if abs(q * 100 - round(q * 100)) < 1e-9 else f"q{q:g}"


# ------------------------------------------------------------------------------------------ the meta


def _meta_depends(series: CheckpointSeries, plan: ExtractionPlan) -> dict[str, str]:
    return {
        "reference": series.fingerprint(plan.reference_step, plan.tensor),
        "final": series.fingerprint(plan.steps[-1], plan.tensor),
    }


def current_meta(series: CheckpointSeries, plan: ExtractionPlan, folder: Path) -> dict | None:
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


def meta_reads(plan: ExtractionPlan) -> list[int]:
    """What `make_meta` reads: the reference, and the final step unless the histogram range is given
    and units are off."""
    needs_final = plan.histogram_range is None or plan.unit_axis is not None
    return [plan.reference_step, *([plan.steps[-1]] if needs_final else [])]


def make_meta(series: CheckpointSeries, plan: ExtractionPlan, folder: Path, read: Read) -> dict:
    """Shape, dtype, the shared histogram range and the unit layout, fixed once per cache folder (whose
    key names the last selected step, so nothing depends on which run filled the cache first).

    With units on, the featured unit (the figures' most bimodal one: the largest dip at the final step)
    is chosen here too, so that its values can be recorded at every step in the one pass."""
    depends = _meta_depends(series, plan)
    ref = read(plan.reference_step)
    extents = [check_finite(ref, plan, plan.reference_step, "reference")]
    shape = tuple(ref.shape)
    axis = plan.resolve_unit_axis(shape)
    final = _final_for_meta(plan, shape, axis, read)
    if final is not None:
        extents.append(extent(final))  # (checked finite by _final_for_meta)
    meta = {
        "tensor": plan.tensor,
        "shape": list(shape),
        "dtype": str(ref.dtype).removeprefix("torch."),
        "half_range": _half_range(plan, extents),
        "reference_step": plan.reference_step,
        "final_step": plan.steps[-1],
        "series": series.identity,
        "depends": depends,
        "unit_axis": axis,
    }
    if axis is not None:
        meta.update(_featured_unit(UnitLayout(shape, axis, plan.unit_sample, plan.seed), ref, final, plan,
                                   folder))  # fmt: skip
    cache.write_json(folder / "meta.json", meta)
    return meta


def _final_for_meta(plan: ExtractionPlan, shape: tuple[int, ...], axis: int | None,
                    read: Read) -> torch.Tensor | None:  # fmt: skip
    """The final step, checked, where the meta needs it: for the histogram range or the featured unit."""
    if plan.histogram_range is not None and axis is None:
        return None
    final_step = plan.steps[-1]
    final = read(final_step)
    check_shape(final, shape, plan, final_step, " (the final step fixes the shared histogram range and "
                                                "cannot be excluded; select other steps)")  # fmt: skip
    check_finite(final, plan, final_step, "final")
    return final


def _half_range(plan: ExtractionPlan, extents: list[float]) -> float:
    """The shared histogram range [-h, h]: as given, or 1.25x the largest |value| at either end."""
    if plan.histogram_range is not None:
        return plan.histogram_range
    half_range = 1.25 * max(extents)
    return half_range if half_range > 0 else 1.0


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


def _write_final_units(units: UnitLayout, final: torch.Tensor, folder: Path) -> dict[str, np.ndarray]:
    dips, cuts = unit_dips(units, final)
    folder.mkdir(parents=True, exist_ok=True)
    save_record(folder / FINAL_UNITS, {"dips": dips, "cuts": cuts})
    return {"dips": dips, "cuts": cuts}


def _final_units(read: Read, plan: ExtractionPlan, folder: Path, units: UnitLayout) -> dict[str, np.ndarray]:
    """The final step's dips and cuts from the meta stage (made again if the file is missing or damaged)."""

    def load(path: Path) -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as data:
            return {"dips": data["dips"], "cuts": data["cuts"]}

    found = cache.read_or_none(folder / FINAL_UNITS, load, "extraction record")
    if found is not None and len(found["dips"]) == units.n_units:
        return found
    return _write_final_units(units, read(plan.steps[-1]), folder)


@dataclass(frozen=True)
class Basis:
    """What every step's record is measured on, fixed once per cache folder: the meta record, the seeded
    samples, the unit layout (None when units are off) and the final step's dips and cuts."""

    meta: dict
    sampling: Sampling
    units: UnitLayout | None
    final_units: dict[str, np.ndarray] | None

    @property
    def lo(self) -> float:
        return -self.meta["half_range"]

    @property
    def hi(self) -> float:
        return self.meta["half_range"]


def open_basis(series: CheckpointSeries, plan: ExtractionPlan, folder: Path, meta: dict | None,
               read: Read) -> Basis:  # fmt: skip
    """The basis from the folder's meta record (`meta`, or made now when None)."""
    meta = meta if meta is not None else make_meta(series, plan, folder, read)
    sampling = Sampling(int(np.prod(meta["shape"])), plan)
    axis = meta.get("unit_axis")
    units = None if axis is None else UnitLayout(tuple(meta["shape"]), axis, plan.unit_sample, plan.seed)
    final_units = None if units is None else _final_units(read, plan, folder, units)
    return Basis(meta, sampling, units, final_units)


# ------------------------------------------------------------------------------------- step records


def step_depends(fingerprint: str, ref_fp: str, prev_step: int | None, prev_fp: str) -> str:
    """What a step's record was computed from: its weights, the reference's and its predecessor's."""
    return f"{fingerprint}|ref:{ref_fp}|prev:{prev_step}:{prev_fp}"


def step_path(folder: Path, step: int) -> Path:
    return folder / "steps" / f"step{step}.npz"


def step_record(x: torch.Tensor, ref: torch.Tensor | None, prev: torch.Tensor | None, step: int,
                prev_step: int | None, plan: ExtractionPlan, basis: Basis, workspace: Workspace,
                final: dict | None = None) -> dict:  # fmt: skip
    """One step's record from the pass over `x` (flat, or 2-D with units); with `final` (the final step's
    dips and cuts) it is complete, each unit's two groups included, otherwise it waits for its dips."""
    units = basis.units
    cuts = None if final is None else final["cuts"]
    stats = step_statistics(x, ref, prev, basis.lo, basis.hi, plan.quantile_bins, plan.chunk_size,
                            workspace, units, cuts)  # fmt: skip
    if not (np.isfinite(stats["min"]) and np.isfinite(stats["max"])):
        raise BadStep(step, f"{plan.tensor} holds non-finite values (NaN or inf)", EXCLUDE_HINT)
    fine = stats.pop("fine_hist")
    unit_stats = stats.pop("units", None)
    quantiles = histogram_quantiles(fine, basis.lo, basis.hi, plan.quantiles, stats["min"], stats["max"])
    record = {"step": step, "prev_step": -1 if prev_step is None else prev_step, **stats}
    record.update({quantile_column(q): v for q, v in zip(plan.quantiles, quantiles, strict=True)})
    gap = (step - prev_step) if prev_step is not None else 0
    record["displacement"] = stats["step_msd"] / gap if gap > 0 else float("nan")
    record["hist"] = fine.reshape(plan.histogram_bins, -1).sum(axis=1)
    flat = x.reshape(-1) if units is not None else x
    record["trajectories"] = flat[torch.from_numpy(basis.sampling.trajectories)].float().numpy()
    record["distribution_sample"] = flat[torch.from_numpy(basis.sampling.distribution)].float().numpy()
    if unit_stats is not None:
        record.update(_unit_fields(x, unit_stats, units, basis.meta))
    if final is not None:
        with_dips(record, units, final["dips"])
        for name, values in unit_stats["split"].items():
            record[f"split_{name}"] = values
    return record


def _unit_fields(x: torch.Tensor, unit_stats: dict, units: UnitLayout, meta: dict) -> dict:
    """A step's per-unit statistics, and the featured unit's density and tracked values."""
    fields = {f"unit_{name}": unit_stats[name] for name in ("mean", "std", "skewness", "kurtosis", "msd")}
    featured = units.unit_values(x, meta["featured_unit"])
    edges = np.asarray(meta["featured_edges"])
    fields["featured_hist"] = np.histogram(featured.numpy().clip(edges[0], edges[-1]), bins=edges)[0]
    fields["featured_values"] = featured[torch.tensor(meta["featured_positions"])].numpy()
    return fields


def _read_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def load_record(path: Path, depends: str) -> dict | None:
    """A step's record if it was made from the same content (a damaged one is recomputed, with a warning)."""
    record = cache.read_or_none(path, _read_npz, "extraction record")
    if record is None or str(record.get("depends")) != depends:
        return None
    return {k: (v.item() if v.ndim == 0 and k != "depends" else v) for k, v in record.items()}


def save_record(path: Path, record: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **{k: np.asarray(v) for k, v in record.items()})

    cache.atomic_write(path, write)


# ------------------------------------------------------------------------------------ the trajectory


def assemble(records: list[dict], plan: ExtractionPlan, basis: Basis) -> Trajectory:
    """The Trajectory of the kept steps' records, in step order."""
    scalar = [{k: v for k, v in r.items() if k not in ARRAY_FIELDS and np.ndim(v) == 0} for r in records]
    table = pd.DataFrame(scalar)
    table["prev_step"] = table["prev_step"].astype(int)
    table["step"] = table["step"].astype(int)
    return Trajectory(
        tensor=plan.tensor,
        shape=tuple(basis.meta["shape"]),
        n=basis.sampling.n,
        table=table,
        hist_edges=np.linspace(basis.lo, basis.hi, plan.histogram_bins + 1),
        hist=_stack(records, "hist"),
        trajectories=_stack(records, "trajectories"),
        trajectory_indices=basis.sampling.trajectories,
        distribution_sample=_stack(records, "distribution_sample"),
        meta={**basis.meta, "reference_step": plan.reference_step},
        units=None if basis.units is None else _unit_trajectory(records, basis.units, basis.meta),
    )


def _stack(records: list[dict], key: str) -> np.ndarray:
    return np.stack([np.asarray(r[key], dtype=np.float64) for r in records])


def _unit_trajectory(records: list[dict], units: UnitLayout, meta: dict) -> UnitTrajectory:
    final = records[-1]
    return UnitTrajectory(
        axis=units.axis,
        length=units.length,
        sample_size=len(units.positions),
        stats={name: _stack(records, f"unit_{name}") for name in UNIT_STATS},
        final_split=pd.DataFrame({name: final[f"split_{name}"] for name in SPLIT_FIELDS}),
        featured=int(meta["featured_unit"]),
        featured_edges=np.asarray(meta["featured_edges"], dtype=np.float64),
        featured_hist=_stack(records, "featured_hist"),
        featured_values=_stack(records, "featured_values"),
        featured_positions=np.asarray(meta["featured_positions"], dtype=np.int64),
    )
