"""The trajectory of one tensor over training: what the extraction pass records, what metrics read."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

ARRAYS = ("hist_edges", "hist", "trajectories", "trajectory_indices", "distribution_sample")


@dataclass
class Trajectory:
    """Per-step statistics of one tensor plus the few arrays the figures and distribution tests need.

    `table` has one row per selected step (column `step` ascending) with the scalar statistics;
    `hist` holds the density on the shared `hist_edges`; `trajectories` the values of a seeded set of
    parameters at every step; `distribution_sample` a larger seeded sample for the dip test and GMM.
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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
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
        return cls(header["tensor"], tuple(header["shape"]), int(header["n"]), table, meta=header["meta"],
                   **arrays)  # fmt: skip
