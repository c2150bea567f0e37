"""The streaming core: checkpoint series -> one tensor per step -> per-step statistics -> Trajectory.

One pass over the steps, holding at most three tensors in their stored dtype (the reference, the
previous step and the current one), whatever the number of steps. Each step's statistics come from a
single fused, chunked pass: the tensor is converted to float32 one cache-sized chunk at a time and every
sum (moments about a shift, squared distances to the reference and to the previous step, the fine
histogram) is taken from that chunk while it is hot. A full-size float32 copy is never made.

Every finished step is written to its own file (atomically) in a cache folder keyed by everything the
numbers depend on, so an interrupted run resumes where it stopped and a rerun recomputes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from garden.errors import GardenError
from garden.series import CheckpointSeries
from garden.trajectory import Trajectory

CACHE_VERSION = 1


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
    chunk_size: int = 1 << 20
    seed: int = 0

    @classmethod
    def from_config(cls, extract_cfg, tensor: str, steps: list[int]) -> ExtractionPlan:
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

    def cache_key(self, series_identity: str) -> str:
        """Hash of what the per-step numbers depend on: not the step list or chunking, but the last
        selected step, whose values (with the reference's) fix the shared histogram range."""
        fields = asdict(self)
        del fields["steps"], fields["chunk_size"]
        fields["range_basis_step"] = self.steps[-1]
        payload = json.dumps({"v": CACHE_VERSION, "series": series_identity, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:20]


def quantile_column(q: float) -> str:
    return f"q{round(q * 100):02d}" if abs(q * 100 - round(q * 100)) < 1e-9 else f"q{q:g}"


class _Sampling:
    """The seeded index sets: optional subsample of the tensor, tracked parameters, distribution sample."""

    def __init__(self, numel: int, plan: ExtractionPlan):
        rng = np.random.default_rng(plan.seed)
        self.subsample = None
        n = numel
        if plan.subsample is not None and plan.subsample < numel:
            self.subsample = np.sort(rng.choice(numel, size=plan.subsample, replace=False))
            n = plan.subsample
        self.n = n
        self.trajectories = np.sort(rng.choice(n, size=min(plan.n_trajectories, n), replace=False))
        self.distribution = np.sort(rng.choice(n, size=min(plan.n_distribution_sample, n), replace=False))
        self._subsample_t = None if self.subsample is None else torch.from_numpy(self.subsample)

    def flat(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.reshape(-1)
        return flat if self._subsample_t is None else flat[self._subsample_t]


class Workspace:
    """Chunk buffers reused by every step: steady allocations keep peak memory flat over any number of
    steps (fresh multi-MB buffers per step let glibc's heap creep up as its mmap threshold adapts)."""

    def __init__(self, chunk_size: int, fine_bins: int):
        self.chunk = torch.empty(chunk_size, dtype=torch.float32)
        self.work = torch.empty(chunk_size, dtype=torch.float32)
        self.counts = torch.empty(fine_bins, dtype=torch.float32)
        self.hist = torch.empty(fine_bins, dtype=torch.float64)


def step_statistics(
    x: torch.Tensor,
    ref: torch.Tensor | None,
    prev: torch.Tensor | None,
    lo: float,
    hi: float,
    fine_bins: int,
    chunk_size: int,
    workspace: Workspace | None = None,
) -> dict:
    """Fused chunked pass over a flat tensor: shifted power sums, distances, extremes, fine histogram.

    Moments are taken about a shift (the first chunk's mean) and converted to central moments in float64,
    which keeps the variance exact when |mean| >> std. Values outside [lo, hi] are counted in the end bins.
    """
    n = x.numel()
    width = min(chunk_size, n)
    space = workspace if workspace is not None else Workspace(width, fine_bins)
    buf, work, counts, hist = space.chunk, space.work, space.counts, space.hist
    hist.zero_()
    shift = float(buf[:width].copy_(x[:width]).mean())
    s1 = s2 = s3 = s4 = sq_ref = sq_prev = 0.0
    vmin, vmax = float("inf"), float("-inf")
    for start in range(0, n, width):
        stop = min(start + width, n)
        c, tmp = buf[: stop - start], work[: stop - start]
        c.copy_(x[start:stop])
        cmin, cmax = torch.aminmax(c)
        vmin, vmax = min(vmin, float(cmin)), max(vmax, float(cmax))
        if ref is not None:
            torch.sub(c, ref[start:stop], out=tmp)
            sq_ref += float(torch.dot(tmp, tmp))
        if prev is not None:
            torch.sub(c, prev[start:stop], out=tmp)
            sq_prev += float(torch.dot(tmp, tmp))
        torch.clamp(c, lo, hi, out=tmp)
        hist += torch.histc(tmp, bins=fine_bins, min=lo, max=hi, out=counts)
        c.sub_(shift)
        s1 += float(c.sum())
        torch.mul(c, c, out=tmp)
        s2 += float(tmp.sum())
        s3 += float(torch.dot(tmp, c))
        s4 += float(torch.dot(tmp, tmp))
    mu1, e2, e3, e4 = s1 / n, s2 / n, s3 / n, s4 / n
    m2 = max(e2 - mu1**2, 0.0)
    m3 = e3 - 3 * mu1 * e2 + 2 * mu1**3
    m4 = e4 - 4 * mu1 * e3 + 6 * mu1**2 * e2 - 3 * mu1**4
    return {
        "mean": shift + mu1,
        "std": m2**0.5,
        "skewness": m3 / m2**1.5 if m2 > 0 else float("nan"),
        "kurtosis": m4 / m2**2 - 3.0 if m2 > 0 else float("nan"),
        "rms": max(e2 + 2 * shift * mu1 + shift**2, 0.0) ** 0.5,
        "min": vmin,
        "max": vmax,
        "msd": sq_ref / n if ref is not None else float("nan"),
        "step_msd": sq_prev / n if prev is not None else float("nan"),
        "fine_hist": hist.numpy().copy(),
    }


def histogram_quantiles(
    counts: np.ndarray, lo: float, hi: float, qs, vmin: float, vmax: float
) -> list[float]:
    """Quantiles (numpy's 'linear' rank q*(n-1)) read off a fine histogram, spreading each bin evenly.

    Exact to within one fine bin width; an exact selection would cost a sort per step (~5x the read).
    """
    cum = np.cumsum(counts)
    n = cum[-1]
    bin_width = (hi - lo) / len(counts)
    out = []
    for q in qs:
        rank = q * (n - 1)
        b = int(np.searchsorted(cum, rank, side="right"))
        b = min(b, len(counts) - 1)
        before = cum[b - 1] if b > 0 else 0.0
        frac = (rank - before + 0.5) / counts[b] if counts[b] > 0 else 0.5
        out.append(float(np.clip(lo + (b + frac) * bin_width, vmin, vmax)))
    return out


def extract(
    series: CheckpointSeries, plan: ExtractionPlan, cache_dir: Path, progress: bool = True
) -> Trajectory:
    """Stream the plan's steps through the fused pass, reusing every step already in the cache."""
    folder = Path(cache_dir) / plan.cache_key(series.identity)
    meta = _prepare_meta(series, plan, folder)
    sampling = _Sampling(int(np.prod(meta["shape"])), plan)
    lo, hi = -meta["half_range"], meta["half_range"]
    reference = None
    ref_fp = series.fingerprint(plan.reference_step, plan.tensor)
    prev_step: int | None = None
    prev_fp = ""
    prev: torch.Tensor | None = None
    records = []
    workspace = Workspace(min(plan.chunk_size, sampling.n), plan.quantile_bins)
    bar = tqdm(plan.steps, desc=f"extract {plan.tensor}", unit="step", disable=not progress)
    for step in bar:
        fingerprint = series.fingerprint(step, plan.tensor)
        depends = f"{fingerprint}|ref:{ref_fp}|prev:{prev_step}:{prev_fp}"
        path = folder / "steps" / f"step{step}.npz"
        record = _load_record(path, depends)
        if record is None:
            if reference is None:
                reference = sampling.flat(series.read_tensor(plan.reference_step, plan.tensor))
            if prev_step is not None and prev is None:
                prev = sampling.flat(series.read_tensor(prev_step, plan.tensor))
            current = sampling.flat(series.read_tensor(step, plan.tensor))
            if current.numel() != reference.numel():
                raise GardenError(
                    f"step {step}: {plan.tensor} has {current.numel()} values, the reference step "
                    f"{plan.reference_step} has {reference.numel()}"
                )
            record = _compute_record(
                current, reference, prev, step, prev_step, plan, sampling, lo, hi, workspace
            )
            record["depends"] = depends
            _save_record(path, record)
            prev = current
        else:
            prev = None  # read again only if a later step needs recomputing
        records.append(record)
        prev_step, prev_fp = step, fingerprint
    bar.close()
    return _assemble(records, plan, meta, sampling, lo, hi)


def _compute_record(x, ref, prev, step, prev_step, plan, sampling, lo, hi, workspace) -> dict:
    stats = step_statistics(x, ref, prev, lo, hi, plan.quantile_bins, plan.chunk_size, workspace)
    fine = stats.pop("fine_hist")
    quantiles = histogram_quantiles(fine, lo, hi, plan.quantiles, stats["min"], stats["max"])
    record = {"step": step, "prev_step": -1 if prev_step is None else prev_step, **stats}
    record.update({quantile_column(q): v for q, v in zip(plan.quantiles, quantiles, strict=True)})
    gap = (step - prev_step) if prev_step is not None else 0
    record["displacement"] = stats["step_msd"] / gap if gap > 0 else float("nan")
    record["hist"] = fine.reshape(plan.histogram_bins, -1).sum(axis=1)
    record["trajectories"] = x[torch.from_numpy(sampling.trajectories)].float().numpy()
    record["distribution_sample"] = x[torch.from_numpy(sampling.distribution)].float().numpy()
    return record


def _prepare_meta(series: CheckpointSeries, plan: ExtractionPlan, folder: Path) -> dict:
    """Shape, dtype and the shared histogram range, fixed once per cache folder (whose key names the
    last selected step, so the range never depends on which run filled the cache first)."""
    final_step = plan.steps[-1]
    depends = {
        "reference": series.fingerprint(plan.reference_step, plan.tensor),
        "final": series.fingerprint(final_step, plan.tensor),
    }
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("depends") == depends:
            return meta
        shutil.rmtree(folder)  # the series changed under the cache: start afresh
    ref = series.read_tensor(plan.reference_step, plan.tensor)
    if plan.histogram_range is not None:
        half_range = plan.histogram_range
    else:
        final = series.read_tensor(final_step, plan.tensor)
        half_range = 1.25 * max(float(ref.abs().max()), float(final.abs().max()))
        half_range = half_range if half_range > 0 else 1.0
    meta = {
        "tensor": plan.tensor,
        "shape": list(ref.shape),
        "dtype": str(ref.dtype).removeprefix("torch."),
        "half_range": half_range,
        "reference_step": plan.reference_step,
        "final_step": final_step,
        "series": series.identity,
        "depends": depends,
    }
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return meta


def _load_record(path: Path, depends: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            record = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError):
        return None  # a damaged cache entry is recomputed, never trusted
    if str(record.get("depends")) != depends:
        return None
    return {k: (v.item() if v.ndim == 0 and k != "depends" else v) for k, v in record.items()}


def _save_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **{k: np.asarray(v) for k, v in record.items()})
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


ARRAY_FIELDS = ("hist", "trajectories", "distribution_sample", "depends")


def _assemble(records, plan, meta, sampling, lo, hi) -> Trajectory:
    table = pd.DataFrame([{k: v for k, v in r.items() if k not in ARRAY_FIELDS} for r in records])
    table["prev_step"] = table["prev_step"].astype(int)
    table["step"] = table["step"].astype(int)
    stack = lambda key: np.stack([np.asarray(r[key], dtype=np.float64) for r in records])  # noqa: E731
    return Trajectory(
        tensor=plan.tensor,
        shape=tuple(meta["shape"]),
        n=sampling.n,
        table=table,
        hist_edges=np.linspace(lo, hi, plan.histogram_bins + 1),
        hist=stack("hist"),
        trajectories=stack("trajectories"),
        trajectory_indices=sampling.trajectories,
        distribution_sample=stack("distribution_sample"),
        meta={**meta, "reference_step": plan.reference_step},
    )
