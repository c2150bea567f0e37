"""The live monitor's part of `make bench`: what watching a training costs, and that it sees what the
offline pass sees.

* time: the tiny GPT-NeoX (garden's default `model=tiny` architecture and batch) trained for a few
  hundred steps on 2 threads, without the monitor, with it on the unembedding every 20 steps (per-unit
  statistics on, logging to an MLflow run) and every step; each training in a fresh process, interleaved,
  the fastest of each kind counts;
* memory: the peak RSS (VmHWM) of the same training (with a 16384-token vocabulary) with the monitor
  (every 20, no logging) on the unembedding, on a small block tensor (128 x 128) and without it, in fresh
  processes with a fixed glibc mmap threshold (median of repeats). What grows with the watched tensor
  (unembedding - small) is held to 2x its float32 size + 10%; the fixed part (small - none: torch's
  first use of a helper thread and of its ops, a few MB whatever the model) is reported;
* agreement: a training that saves a checkpoint at every observation, then `garden.extract` and the metric
  registry on those checkpoints: MSD, displacement, Sarle's BC and the bimodal-unit fraction equal to the
  live numbers.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

WATCHED = ("unembedding",)
MEMORY_VOCAB = 16384  # the memory figure's unembedding: 16384 x 128, 8 MiB in float32
SMALL = ("attn_out.0",)  # 128 x 128: the monitor's fixed cost, with units on as for the unembedding
EVERY = 20
TRAIN_STEPS = 120
THREADS = 2
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
LIVE_AND_OFFLINE = {
    "msd": "diffusion/msd",
    "displacement": "diffusion/displacement",
    "bimodality_coefficient": "bimodality/bimodality_coefficient",
    "bimodal_unit_fraction": "units/bimodal_unit_fraction",
}


def tiny_settings(vocab_size: int | None = None):
    """garden's default tiny model settings (conf/model/tiny.yaml), read through the schema; a wider
    vocabulary for the memory figure (a 1 MiB unembedding is within the run-to-run noise of the peak)."""
    from omegaconf import OmegaConf

    from garden.config import config_dir
    from garden.settings import ModelSettings, read_section

    values = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / "tiny.yaml"))
    values["train"]["seed"] = 0
    if vocab_size is not None:
        values["architecture"]["vocab_size"] = vocab_size
    return read_section(ModelSettings, values, "model.")


def _vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no /proc/self/status")


def _train(settings, data: torch.Tensor, steps: int, every: int | None, log: bool,
           layers=WATCHED) -> tuple[float, object]:  # fmt: skip
    """One training of `steps` steps from the seeded init, watched every `every` steps (None: not at all):
    the loop's seconds and the monitor."""
    from garden.monitor import WeightMonitor
    from garden.tiny import build_trainer, train_step

    trainer = build_trainer(settings, torch.device("cpu"))
    monitor = None if every is None else WeightMonitor(trainer[0], layers, every, log=log)
    began = time.perf_counter()
    if monitor is not None:
        monitor.observe(0)
    for step in range(1, steps + 1):
        train_step(*trainer, data, settings.train, "cpu")
        if monitor is not None and monitor.due(step):
            monitor.observe(step)
    if monitor is not None:
        monitor.close()
    return time.perf_counter() - began, monitor


def _data(settings) -> torch.Tensor:
    vocab = settings.architecture["vocab_size"]
    return torch.randint(0, vocab, (200_000,), generator=torch.Generator().manual_seed(0))


def timing_child(steps: int, repeats: int, workdir: Path) -> dict:
    """In one fresh process, on 2 threads, inside an MLflow run (as a training script holds one): the
    trainings without the monitor, with it every 20 steps and every step, interleaved `repeats` times."""
    import mlflow

    from garden.devices import pinned_threads

    settings = tiny_settings()
    data = _data(settings)
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlflow.db")
    mlflow.set_experiment("bench-monitor")
    seconds: dict[str, list[float]] = {"off": [], "every20": [], "every1": []}
    monitor_seconds: dict[str, list[float]] = {"every20": [], "every1": []}
    with mlflow.start_run(run_name="bench-monitor"), pinned_threads(THREADS):
        for _ in range(repeats):
            for mode, every in (("off", None), ("every20", EVERY), ("every1", 1)):
                took, monitor = _train(settings, data, steps, every, log=True)
                seconds[mode].append(took)
                if monitor is not None:
                    monitor_seconds[mode].append(monitor.seconds)
    return {"seconds": seconds, "monitor_seconds": monitor_seconds}


def memory_child(watched: str, steps: int) -> dict:
    """One training in this fresh process, with the monitor on `watched` (`unembedding`, `small`) or
    without it (`none`), no logging; the modules the monitor uses are imported either way (code is not the
    monitor's memory)."""
    import diptest  # noqa: F401
    import scipy.stats  # noqa: F401

    import garden.dip  # noqa: F401
    from garden.devices import pinned_threads

    settings = tiny_settings(MEMORY_VOCAB)
    data = _data(settings)
    with pinned_threads(THREADS):
        layers = {"unembedding": WATCHED, "small": SMALL}.get(watched)
        _, monitor = _train(
            settings, data, steps, None if layers is None else EVERY, False, layers or WATCHED
        )
    return {"vm_hwm_kib": _vm_hwm_kib(), "snapshot_bytes": monitor.snapshot_bytes if monitor else 0}


def _run_child(args: list[str], env: dict | None = None) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    done = subprocess.run(
        command, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def overhead(workdir: Path, repeats: int, steps: int = TRAIN_STEPS) -> dict:
    """Training seconds without / with the monitor (the fastest of `repeats` each, in one process)."""
    found = _run_child(["timing", str(steps), str(repeats), str(workdir)])
    best = {mode: min(runs) for mode, runs in found["seconds"].items()}
    own = {mode: min(runs) for mode, runs in found["monitor_seconds"].items()}
    return {
        "steps": steps,
        "runs_s": found["seconds"],
        "seconds": best,
        "every20_over_off": best["every20"] / best["off"],
        "every1_over_off": best["every1"] / best["off"],
        "monitor_own_s": own,
    }


def memory(workdir: Path, repeats: int, steps: int = 41) -> dict:
    """Peak RSS with the monitor on the unembedding, on a small tensor and without it (medians of
    `repeats` interleaved fresh processes each)."""
    runs: dict[str, list[dict]] = {"none": [], "small": [], "unembedding": []}
    for _ in range(repeats):
        for watched in runs:
            runs[watched].append(_run_child(["memory", watched, str(steps)], FIXED_MALLOC))
    peak = {
        watched: statistics.median(r["vm_hwm_kib"] * 1024 for r in found) for watched, found in runs.items()
    }
    settings = tiny_settings(MEMORY_VOCAB)
    watched_bytes = settings.architecture["vocab_size"] * settings.architecture["hidden_size"] * 4
    return {
        "peak_bytes": peak,
        "runs_kib": {w: [r["vm_hwm_kib"] for r in found] for w, found in runs.items()},
        "grows_with_tensor_bytes": peak["unembedding"] - peak["small"],
        "fixed_bytes": peak["small"] - peak["none"],
        "extra_bytes": peak["unembedding"] - peak["none"],
        "watched_float32_bytes": watched_bytes,
        "snapshot_bytes": runs["unembedding"][0]["snapshot_bytes"],
    }


def agreement(workdir: Path, steps: int = 100, every: int = 20) -> dict:
    """Live numbers against the offline pass on checkpoints saved at the observed steps."""
    from garden.devices import pinned_threads
    from garden.extract import ExtractionPlan, extract
    from garden.metrics import compute_metrics, step_metrics
    from garden.monitor import WeightMonitor
    from garden.series import LocalSeries
    from garden.tiny import build_trainer, train_step

    settings = tiny_settings()
    data = torch.randint(
        0, settings.architecture["vocab_size"], (200_000,), generator=torch.Generator().manual_seed(1)
    )
    series = Path(tempfile.mkdtemp(prefix="monitor-series-", dir=workdir))
    with pinned_threads(THREADS):
        trainer = build_trainer(settings, torch.device("cpu"))
        model = trainer[0]
        monitor = WeightMonitor(model, WATCHED, every, log=False)
        for step in range(steps + 1):
            if step > 0:
                train_step(*trainer, data, settings.train, "cpu")
            if monitor.due(step):
                monitor.observe(step)
                model.save_pretrained(series / f"step{step}")
    observed = monitor.watched[0].history
    plan = ExtractionPlan(tensor="embed_out.weight", steps=tuple(observed.steps), reference_step=0)
    trajectory = extract(LocalSeries(series), plan, workdir / "monitor-cache", progress=False)
    offline = step_metrics(compute_metrics(trajectory, ["msd", "displacement", "bimodality_coefficient",
                                                        "unit_bimodality"]))  # fmt: skip
    worst = {}
    for column, key in LIVE_AND_OFFLINE.items():
        name = next(k for k in offline if k.endswith("/" + column))
        expected, found = np.asarray(offline[name]), np.asarray(observed.values[key])
        both = np.isfinite(expected)
        assert (np.isfinite(found) == both).all(), column
        scale = np.maximum(np.abs(expected[both]), 1e-300)
        worst[column] = float(np.max(np.abs(found[both] - expected[both]) / scale)) if both.any() else 0.0
    return {"steps": observed.steps, "max_rel_diff": worst}


if __name__ == "__main__":
    if sys.argv[1] == "timing":
        print(json.dumps(timing_child(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))))
    else:
        print(json.dumps(memory_child(sys.argv[2], int(sys.argv[3]))))
