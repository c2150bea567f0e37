"""The whole-model scan's part of `make bench` (`task=scan`), on the bench's pythia-160m-shaped series
(fp16, every 2-D block weight plus the embedding and the unembedding: 50 tensors, 124M parameters):

* time per checkpoint of the scan's pass (`extract_scan`, a fresh cache, meta included) with per-unit
  statistics off and on, against the floor of reading that checkpoint's selected tensors (`safe_open` once
  per file, `get_tensor` + `.float()` for each); with units on, the dips of every unit of every tensor
  (~66k per step here) are timed apart with the `diptest` package's loop on the same samples, which is what
  exact per-step dips cost whatever garden does;
* the content ids a first scan hashes by reading the files again: only the reference's and the final
  step's (the meta's); every other step is hashed from the copy the pass holds;
* a scan against one-tensor-per-job runs over the same tensors (the embeddings and blocks 0-1, 10 tensors:
  `python -m garden task=scan scan.blocks=0:2` against ten `python -m garden layer=...` processes, each
  with its own data folder and MLflow store, figures on, as a researcher runs them);
* the peak RSS (VmHWM) of a scan (the pass and the metrics of every tensor, as `task=scan` runs them) over
  10 and over 40 checkpoints, in fresh processes with a fixed glibc mmap threshold: the 40-step series
  hard-links the 20 checkpoints twice over (`series.on_duplicate=keep`), which costs no disk and reads
  the same bytes as 40 distinct ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
JOB_ROLES = (("unembedding", None), ("embedding", None), *((r, b) for b in (0, 1)
             for r in ("attn_qkv", "attn_out", "mlp_in", "mlp_out")))  # fmt: skip


def selected(root: Path) -> list[str]:
    """The tensors `task=scan` selects by default in this series (garden's own selection)."""
    from garden.families import FAMILIES
    from garden.scan import select_tensors
    from garden.series import LocalSeries

    series = LocalSeries(root)
    config = series.model_config()
    names = series.tensor_names(series.steps()[0])
    return [t.name for t in select_tensors(FAMILIES["gpt_neox"], config, names, config["num_hidden_layers"])]


def floor_step_seconds(root: Path, steps: list[int], names: list[str]) -> float:
    """Median per-step time to read the selected tensors and convert them to float32."""
    times = []
    for step in steps:
        start = time.perf_counter()
        with safe_open(str(root / f"step{step}" / "model.safetensors"), "pt") as handle:
            for name in names:
                converted = handle.get_tensor(name).float()
        times.append(time.perf_counter() - start)
        assert converted.dtype == torch.float32
    return float(np.median(times))


def scan_step_seconds(root: Path, steps: list[int], names: list[str], workdir: Path,
                      unit_axis: str | None) -> float:  # fmt: skip
    """The scan's pass over the steps with a fresh cache (meta included), per step."""
    from garden.extract import ExtractionPlan
    from garden.extract.stream import extract_scan
    from garden.series import LocalSeries

    cache = Path(tempfile.mkdtemp(prefix="scan-", dir=workdir))
    try:
        plans = [ExtractionPlan(tensor=name, steps=tuple(steps), reference_step=steps[0], unit_axis=unit_axis)
                 for name in names]  # fmt: skip
        start = time.perf_counter()
        extract_scan(LocalSeries(root), plans, cache, progress=False)
        return (time.perf_counter() - start) / len(steps)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def diptest_loop_seconds(root: Path, step: int, names: list[str]) -> float:
    """The `diptest` package's dip and p-value for every unit of every selected tensor at one step, on the
    samples the scan draws (garden's `UnitLayout`): what exact dips cost, one call per unit."""
    import diptest

    from garden.extract import ExtractionPlan, UnitLayout

    plan = ExtractionPlan(tensor="", steps=(0,), reference_step=0)
    seconds = 0.0
    with safe_open(str(root / f"step{step}" / "model.safetensors"), "pt") as handle:
        for name in names:
            tensor = handle.get_tensor(name)
            samples = UnitLayout(tuple(tensor.shape), 1, plan.unit_sample, plan.seed).samples(tensor)
            columns = samples.double().numpy()
            start = time.perf_counter()
            for row in columns:
                diptest.diptest(row)
            seconds += time.perf_counter() - start
    return seconds


def hashed_from_files(run) -> tuple[object, list[tuple[int, str]]]:
    """`run()`'s result and the (step, tensor) content ids it hashed by reading the files (not from the
    copy the pass holds)."""
    from garden import series as series_module

    hashed: list[tuple[int, str]] = []
    original = series_module.tensor_content_id

    def counting(files, tensor):
        hashed.append((files.step, tensor))
        return original(files, tensor)

    series_module.tensor_content_id = counting
    try:
        return run(), hashed
    finally:
        series_module.tensor_content_id = original


def timings(root: Path, steps: list[int], workdir: Path, repeats: int) -> dict:
    names = selected(root)
    floor = min(floor_step_seconds(root, steps, names) for _ in range(2))
    first, hashed = hashed_from_files(lambda: scan_step_seconds(root, steps, names, workdir, None))
    off = min([first, *(scan_step_seconds(root, steps, names, workdir, None) for _ in range(repeats - 1))])
    on = min(scan_step_seconds(root, steps, names, workdir, "auto") for _ in range(repeats))
    dips = diptest_loop_seconds(root, steps[-1], names)
    found = {"tensors": len(names), "steps": len(steps), "floor_s": floor, "scan_off_s": off, "scan_on_s": on,
             "diptest_loop_s": dips, "parameters": sum(_numel(root, steps[0], n) for n in names),
             "steps_hashed_from_files": sorted({step for step, _ in hashed}),
             "hashes_from_files": len(hashed)}  # fmt: skip
    print(f"scan timings: {json.dumps(found)}", flush=True)
    return found


def _numel(root: Path, step: int, name: str) -> int:
    with safe_open(str(root / f"step{step}" / "model.safetensors"), "pt") as handle:
        return int(np.prod(handle.get_slice(name).get_shape()))


def _garden(workdir: Path, *overrides: str) -> float:
    """One `python -m garden` job as a researcher runs it (its own data and MLflow store); wall seconds."""
    places = [f"paths.data_dir={workdir}/data", f"tracking.uri=sqlite:///{workdir}/mlflow.db",
              f"hydra.run.dir={workdir}/out"]  # fmt: skip
    command = [sys.executable, "-m", "garden", "progress=false", *places, *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def scan_against_jobs(root: Path, workdir: Path) -> dict:
    """Ten one-tensor jobs against one scan of the same ten tensors (scan.blocks=0:2), each route from an
    empty cache."""
    series = ["model=local", f"model.path={root}"]
    jobs = []
    for role, block in JOB_ROLES:
        folder = Path(tempfile.mkdtemp(prefix="job-", dir=workdir))
        layer = [f"layer={role}", *([] if block is None else [f"layer.index={block}"])]
        jobs.append(_garden(folder, *series, *layer))
        shutil.rmtree(folder, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix="scan-job-", dir=workdir))
    scan = _garden(folder, *series, "task=scan", "scan.blocks=0:2")
    shutil.rmtree(folder, ignore_errors=True)
    found = {"jobs_s": jobs, "jobs_total_s": sum(jobs), "scan_s": scan}
    print(f"scan vs jobs: {json.dumps(found)}", flush=True)
    return found


def rss_series(root: Path, workdir: Path, n_steps: int) -> Path:
    """`n_steps` checkpoint folders hard-linked to the series' checkpoints in turn (no disk, same bytes)."""
    target = workdir / f"scan-rss-{n_steps}"
    if target.exists():
        shutil.rmtree(target)
    source = sorted((p for p in root.iterdir() if p.name.startswith("step")), key=lambda p: int(p.name[4:]))
    for step in range(n_steps):
        folder = target / f"step{step}"
        folder.mkdir(parents=True)
        for file in source[step % len(source)].iterdir():
            os.link(file, folder / file.name)
    return target


def rss_child(root: Path, n_steps: int, data: Path) -> None:
    """Entry point of a fresh process: `task=scan`'s pass and metrics over the first n steps, then its peak
    RSS (KiB) as JSON on the last line."""
    from hydra import compose, initialize_config_dir

    from garden.config import config_dir
    from garden.settings import resolve
    from garden.tasks.scan import open_scan, scan_tensors, settle_duplicates

    values = "[" + ",".join(str(s) for s in range(n_steps)) + "]"
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "task=scan", "model=local", f"model.path={root}", "progress=false", f"paths.data_dir={data}",
            "steps=list", f"steps.values={values}", "series.on_duplicate=keep"])  # fmt: skip
    summary = scan_tensors(settle_duplicates(open_scan(resolve(cfg)))).summary
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            print(json.dumps({"vm_hwm_kib": int(line.split()[1]), "tensors": len(summary)}))


def peak_rss(root: Path, workdir: Path, small: int, large: int) -> dict:
    series = rss_series(root, workdir, large)
    found: dict[str, float] = {}
    try:
        for n in (small, large):
            data = Path(tempfile.mkdtemp(prefix="scan-rss-data-", dir=workdir))
            child = [str(Path(__file__).resolve()), "--rss-child", str(series), str(n), str(data)]
            command = [sys.executable, *child]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **FIXED_MALLOC})
            shutil.rmtree(data, ignore_errors=True)
            if done.returncode != 0:
                raise RuntimeError(f"the scan RSS child failed:\n{done.stderr[-3000:]}")
            found[str(n)] = json.loads(done.stdout.strip().splitlines()[-1])["vm_hwm_kib"]
    finally:
        shutil.rmtree(series, ignore_errors=True)
    names = selected(root)
    largest = max(_numel(root, 0, name) for name in names) * 4
    result = {"kib": found, "largest_float32_bytes": largest, "small": small, "large": large}
    print(f"scan peak RSS: {json.dumps(result)}", flush=True)
    return result


def measure(root: Path, steps: list[int], workdir: Path, repeats: int, rss_steps: tuple[int, int]) -> dict:
    return {
        "timings": timings(root, steps, workdir, repeats),
        "jobs": scan_against_jobs(root, workdir),
        "rss": peak_rss(root, workdir, *rss_steps),
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rss-child"]:
        rss_child(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
