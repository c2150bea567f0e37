"""The trajectory of one tensor over training: what the extraction pass records, what metrics read."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

ARRAYS = ("hist_edges", "hist", "trajectories", "trajectory_indices", "distribution_sample")
UNIT_ARRAYS = ("featured_edges", "featured_hist", "featured_values", "featured_positions")


def sarle_bimodality(skewness, excess_kurtosis, n: int):
    """Sarle's BC = (g^2 + 1) / (k + 3 (n-1)^2 / ((n-2)(n-3))); above 5/9 reads as bimodal."""
    g = np.asarray(skewness, dtype=float)
    k = np.asarray(excess_kurtosis, dtype=float)
    correction = 3.0 * (n - 1) ** 2 / ((n - 2) * (n - 3))
    return (g**2 + 1.0) / (k + correction)


@dataclass
class UnitTrajectory:
    """Per-unit statistics over the steps: a unit is one slice of a 2-D tensor along `axis` (axis 1: a
    column, e.g. one hidden unit's weights to every token of `embed_out.weight`).

    `stats[name]` is [steps, units] for mean, std, skewness, kurtosis (excess), msd (from the reference
    step), dip and dip_pvalue (Hartigan's dip on `sample_size` seeded entries of the unit). The featured
    unit (the largest dip at the final step) has its density on `featured_edges` and the values of a few
    seeded entries (`featured_positions` along its slice) at every step; `final_split` holds each unit's
    two groups at the final step (cut, sizes and means).
    """

    axis: int
    length: int
    sample_size: int
    stats: dict[str, np.ndarray]
    final_split: pd.DataFrame
    featured: int
    featured_edges: np.ndarray
    featured_hist: np.ndarray
    featured_values: np.ndarray
    featured_positions: np.ndarray

    @property
    def n_units(self) -> int:
        return int(self.stats["dip"].shape[1])

    @property
    def bimodality_coefficient(self) -> np.ndarray:
        """[steps, units] Sarle's coefficient of each unit's whole slice."""
        return sarle_bimodality(self.stats["skewness"], self.stats["kurtosis"], self.length)


@dataclass
class Trajectory:
    """Per-step statistics of one tensor plus the few arrays the figures and distribution tests need.

    `table` has one row per selected step (column `step` ascending) with the scalar statistics;
    `hist` holds the density on the shared `hist_edges`; `trajectories` the values of a seeded set of
    parameters at every step; `distribution_sample` a larger seeded sample for the dip test and GMM;
    `units` the per-unit statistics (None when units are off or the tensor has none).
    """

    tensor: str
    shape: tuple[int, ...]
    n: int
    table: pd.DataFrame
    hist_edges: np.ndarray
    hist: np.ndarray
    trajectories: np.ndarray
    trajectory_indices: np.ndarray
    distribution_sample: np.ndarray
    meta: dict = field(default_factory=dict)
    units: UnitTrajectory | None = None
    #: Steps the pass computed (the others' records came from the cache); not saved: it says what one run
    #: did, not what the trajectory is.
    computed_steps: int | None = None

    @property
    def steps(self) -> np.ndarray:
        return self.table["step"].to_numpy()

    def column(self, name: str) -> np.ndarray:
        return self.table[name].to_numpy(dtype=float)

    def save(self, path: Path) -> None:
        """One .npz (written atomically): the hand-over between the DVC extract and metrics stages."""
        header = {
            "tensor": self.tensor,
            "shape": list(self.shape),
            "n": self.n,
            "columns": list(self.table.columns),
            "dtypes": [str(t) for t in self.table.dtypes],
            "meta": self.meta,
        }
        arrays = {name: getattr(self, name) for name in ARRAYS}
        arrays.update({f"column_{i}": self.table[c].to_numpy() for i, c in enumerate(self.table.columns)})
        if self.units is not None:
            u = self.units
            header["units"] = {"axis": u.axis, "length": u.length, "sample_size": u.sample_size,
                               "featured": u.featured, "stats": list(u.stats),
                               "split": list(u.final_split.columns)}  # fmt: skip
            arrays.update({f"unit_{name}": values for name, values in u.stats.items()})
            arrays.update({f"split_{name}": u.final_split[name].to_numpy() for name in u.final_split})
            arrays.update({name: getattr(u, name) for name in UNIT_ARRAYS})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, header=np.array(json.dumps(header)), **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Trajectory:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            table = pd.DataFrame(
                {c: data[f"column_{i}"].astype(t) for i, (c, t) in
                 enumerate(zip(header["columns"], header["dtypes"], strict=True))}
            )  # fmt: skip
            arrays = {name: data[name] for name in ARRAYS}
            units = None
            if "units" in header:
                u = header["units"]
                units = UnitTrajectory(
                    axis=u["axis"], length=u["length"], sample_size=u["sample_size"], featured=u["featured"],
                    stats={name: data[f"unit_{name}"] for name in u["stats"]},
                    final_split=pd.DataFrame({name: data[f"split_{name}"] for name in u["split"]}),
                    **{name: data[name] for name in UNIT_ARRAYS},
                )  # fmt: skip
        return cls(header["tensor"], tuple(header["shape"]), int(header["n"]), table, meta=header["meta"],
                   units=units, **arrays)  # fmt: skip
