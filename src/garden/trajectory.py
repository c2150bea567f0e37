"""The trajectory of one tensor over training: what the extraction pass records, what metrics read."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


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
