"""Paper 003: two-phase training dynamics of a one-layer transformer on word co-occurrence.

"Training Dynamics of Transformers to Recognize Word Co-occurrence via Gradient Flow Analysis"
(arXiv 2410.09605). Tokens are one-hot mu_1..mu_d; y = +1 when mu_1 and mu_2 both occur (probability
1/2), y = -1 for only mu_1, only mu_2, or neither (1/6 each); mu_3 occurs in every sequence. The model

    F(X) = sum_l sum_j a_j w_j^T W_V X softmax(X^T W_K^T W_Q x_l / sqrt(m))

is trained by full-batch gradient descent on the logistic loss. Phase 1 aligns the linear readout
G(mu) = sum_j a_j w_j^T W_V mu while the attention barely moves; Phase 2 moves the attention scores
mu_i^T W_K^T W_Q mu_j. Parameter snapshots are saved as a checkpoint series on a Pythia-like schedule, so
the core dynamics analysis (MSD, bimodality, ...) reads them like any other series.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from garden import cache
from garden.metrics.events import onset_index
from garden.progress import bar as progress_bar
from garden.schedule import log_linear_schedule
from garden.settings import CooccurrenceSettings, as_plain

CLASSES = ("both", "only_1", "only_2", "neither")
PARAMETERS = ("W_Q", "W_K", "W_V", "W")
SCORE_PAIRS = ((1, 2), (2, 1), (3, 1), (3, 2))  # (i, j): mu_i^T W_K^T W_Q mu_j, 1-based as in the paper


@dataclass
class Dataset:
    tokens: torch.Tensor  # (n, L) token indices, 0-based (mu_1 is index 0)
    labels: torch.Tensor  # (n,) +1 / -1
    classes: np.ndarray  # (n,) class name per sample


def make_dataset(n: int, length: int, d: int, seed: int) -> Dataset:
    """Exact class proportions (n/2 both, n/6 each other class); mu_3 at a random position of every
    sequence; mu_1/mu_2 at other random positions as the class says; the rest uniform over mu_4..mu_d
    (n a multiple of 6, length >= 3, d >= 4: the schema's rules for cooccurrence.n, .L and .d)."""
    rng = np.random.default_rng(seed)
    counts = {"both": n // 2, "only_1": n // 6, "only_2": n // 6, "neither": n // 6}
    classes = np.array([c for c, k in counts.items() for _ in range(k)])
    tokens = rng.integers(3, d, size=(n, length))  # mu_4..mu_d
    for row, cls in enumerate(classes):
        slots = rng.permutation(length)
        tokens[row, slots[0]] = 2  # mu_3, the common word
        if cls in ("both", "only_1"):
            tokens[row, slots[1]] = 0  # mu_1
        if cls in ("both", "only_2"):
            tokens[row, slots[2]] = 1  # mu_2
    labels = np.where(classes == "both", 1.0, -1.0)
    return Dataset(torch.as_tensor(tokens), torch.as_tensor(labels, dtype=torch.float64), classes)


class CooccurrenceModel(torch.nn.Module):
    """W_Q, W_K, W_V in R^{m x d}, W in R^{m1 x m}, fixed signs a in {+1, -1}^{m1}; no causal mask."""

    def __init__(self, d: int, m: int, m1: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)

        def kaiming(rows: int, cols: int) -> torch.nn.Parameter:  # N(0, 2 / fan_in)
            return torch.nn.Parameter(
                torch.randn(rows, cols, generator=gen, dtype=torch.float64) * math.sqrt(2 / cols)
            )

        self.W_Q, self.W_K, self.W_V = kaiming(m, d), kaiming(m, d), kaiming(m, d)
        self.W = kaiming(m1, m)
        signs = torch.where(torch.rand(m1, generator=gen) < 0.5, -1.0, 1.0).double()
        self.register_buffer("a", signs)
        self.m = m

    def readout(self) -> torch.Tensor:
        """sum_j a_j w_j^T as one m-vector."""
        return self.a @ self.W

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Columns of X are one-hot, so W X is a column lookup.
        q, k, v = self.W_Q.T[tokens], self.W_K.T[tokens], self.W_V.T[tokens]  # (n, L, m)
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.m), dim=-1)  # query l, key l'
        return ((attention @ v) @ self.readout()).sum(dim=1)

    @torch.no_grad()
    def attention_score(self, i: int, j: int) -> float:
        return float(self.W_K[:, i - 1] @ self.W_Q[:, j - 1])

    @torch.no_grad()
    def readout_value(self, i: int) -> float:
        """G(mu_i) = sum_j a_j w_j^T W_V mu_i."""
        return float(self.readout() @ self.W_V[:, i - 1])


def log_epochs(epochs: int, points: int) -> list[int]:
    """About `points` epochs spread on a log scale from 0 to `epochs` (always both ends)."""
    grid = np.unique(np.round(np.geomspace(1, epochs, num=max(points - 1, 1))).astype(int))
    return sorted({0, *grid.tolist(), epochs})


def snapshot_steps(epochs: int, interval: int) -> list[int]:
    return log_linear_schedule(interval, epochs)


def run_config_hash(co: CooccurrenceSettings) -> str:
    """The run's folder key: the settings the training depends on and this module's code (garden.cache)."""
    payload = as_plain(co)
    keep = {k: payload[k] for k in ("n", "L", "d", "m", "m1", "lr", "epochs", "seed", "snapshot_interval")}
    return cache.cache_key("cooccurrence", **keep)[:12]


@dataclass
class TrainingRecord:
    table: pd.DataFrame  # one row per logged epoch
    summary: dict[str, float]
    snapshots: Path


def train(co: CooccurrenceSettings, series_dir: Path, progress: bool = True) -> TrainingRecord:
    """Full-batch gradient descent; observables at log-spaced epochs; snapshots on a Pythia-like schedule.

    A finished run (its folder name hashes the settings and the code) is read back instead of trained
    again; an unfinished one is trained afresh (it takes seconds) and marked complete only at the end.
    Jobs that start together train it once: the others wait on its lock, then read it back.
    """
    finished = _finished(series_dir)
    if finished is not None:
        return finished
    with cache.producing(series_dir, "the co-occurrence run"):
        return _finished(series_dir) or _train(co, series_dir, progress)


def _finished(series_dir: Path) -> TrainingRecord | None:
    marker, observables = series_dir / "COMPLETE", series_dir / "observables.csv"
    summary = cache.read_json(marker, "co-occurrence record")
    table = cache.read_or_none(observables, pd.read_csv, "co-occurrence record")
    if summary is None or table is None:
        return None
    return TrainingRecord(table, summary, series_dir)


def _train(co: CooccurrenceSettings, series_dir: Path, progress: bool) -> TrainingRecord:
    marker, observables = series_dir / "COMPLETE", series_dir / "observables.csv"
    n, length, d, m, m1 = co.n, co.L, co.d, co.m, co.m1
    epochs, seed = co.epochs, co.seed
    data = make_dataset(n, length, d, seed)
    model = CooccurrenceModel(d, m, m1, seed)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    initial_scores = np.array([model.attention_score(i, j) for i, j in SCORE_PAIRS])
    logged, snapshots = (
        set(log_epochs(epochs, co.log_points)),
        set(snapshot_steps(epochs, co.snapshot_interval)),
    )
    masks = {c: torch.as_tensor(data.classes == c) for c in CLASSES}
    series_dir.mkdir(parents=True, exist_ok=True)
    with _one_intra_op_thread():
        rows = _descend(co, model, data, masks, initial, logged, snapshots, series_dir, progress)
    table = pd.DataFrame(rows)
    summary = phase_summary(table, initial_scores, co.attention_move_fraction)
    cache.write_json(series_dir / "config.json", {"model_type": "cooccurrence", "epochs": epochs})
    cache.atomic_write(observables, lambda tmp: table.to_csv(tmp, index=False))
    cache.write_json(marker, summary)
    return TrainingRecord(table, summary, series_dir)


@contextlib.contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Run the descent on one torch thread, then restore the count.

    Its tensors hold a few thousand numbers. Alone on 2 cores a second intra-op thread gains 15%
    (895 vs 761 epoch/s), but beside another busy job every barrier waits for a descheduled thread:
    153 vs 713 epoch/s next to a 2-thread matmul loop, under 10 epoch/s next to the test suite.
    The numbers computed are the same.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _descend(
    co,
    model: CooccurrenceModel,
    data: Dataset,
    masks: dict[str, torch.Tensor],
    initial: dict[str, torch.Tensor],
    logged: set[int],
    snapshots: set[int],
    series_dir: Path,
    progress: bool,
) -> list[dict]:
    """The epochs of full-batch gradient descent; returns the observables at the logged epochs."""
    epochs = co.epochs
    optimizer = torch.optim.SGD(model.parameters(), lr=co.lr)
    rows = []
    for epoch in progress_bar(range(epochs + 1), desc="gradient descent", unit="epoch", enabled=progress,
                              miniters=500):  # fmt: skip
        output = model(data.tokens)
        margins = data.labels * output
        per_sample = torch.nn.functional.softplus(-margins)  # log(1 + exp(-y F)), stable
        loss = per_sample.mean()
        if epoch in logged:
            with torch.no_grad():
                g = torch.sigmoid(-margins)  # 1 / (1 + exp(y F))
                row = {"epoch": epoch, "loss": float(loss), "accuracy": float((margins > 0).double().mean())}
                row.update({f"loss_{c}": float(per_sample[masks[c]].mean()) for c in CLASSES})
                row.update({f"score_{i}{j}": model.attention_score(i, j) for i, j in SCORE_PAIRS})
                row.update({f"G_mu{i}": model.readout_value(i) for i in (1, 2, 3)})
                row["gradient_balance"] = float(g[masks["only_1"]].sum() / g[masks["only_2"]].sum())
                for name, param in model.named_parameters():
                    row[f"rel_change_{name}"] = float((param - initial[name]).norm() / initial[name].norm())
                rows.append(row)
        if epoch in snapshots:
            _save_snapshot(model, series_dir, epoch)
        if epoch == epochs:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return rows


def _save_snapshot(model: CooccurrenceModel, folder: Path, epoch: int) -> None:
    target = folder / f"step{epoch}"
    target.mkdir(parents=True, exist_ok=True)
    state = {name: p.detach().float().contiguous() for name, p in model.named_parameters()}
    cache.atomic_write(target / "model.safetensors",
                       lambda tmp: save_file(state, str(tmp), metadata={"epoch": str(epoch)}))  # fmt: skip


def phase_summary(table: pd.DataFrame, initial_scores: np.ndarray, move_fraction: float) -> dict[str, float]:
    """Phase 1 ends at the first logged epoch with every sample correct; the attention 'starts to move' at
    the first logged epoch from which the largest score change since init stays at or above
    `move_fraction` of the largest initial |score| (working definition: a fixed fraction of the scores'
    own scale, so it does not depend on how long the run is)."""
    epochs = table["epoch"].to_numpy()
    summary = {
        "final_loss": float(table["loss"].iloc[-1]),
        "final_accuracy": float(table["accuracy"].iloc[-1]),
    }
    correct = np.flatnonzero(table["accuracy"].to_numpy() >= 1.0)
    if len(correct):
        summary["phase1_end_epoch"] = float(epochs[correct[0]])
    scores = table[[f"score_{i}{j}" for i, j in SCORE_PAIRS]].to_numpy()
    moved = np.abs(scores - initial_scores).max(axis=1)
    start = onset_index(moved >= move_fraction * np.abs(initial_scores).max())
    if start is not None:
        summary["attention_move_epoch"] = float(epochs[start])
    return summary
