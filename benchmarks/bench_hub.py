"""The Hub part of `make bench`: what garden fetches per weight format, and fetching ahead.

* bytes fetched for `embed_out.weight` against its own bytes, per layout, on a fake Hub (127.0.0.1):
  safetensors, sharded safetensors, zip `.bin` and sharded `.bin` of pythia-160m-shaped checkpoints, and
  a 12b-like layout at small scale (36 blocks, the head in the last of three `.bin` shards beside a third
  of the blocks: pythia-12b's step branches hold only such shards, GBs each);
* time of `extract` over a fake Hub in its own process throttled to a bandwidth per connection with a
  latency per request, with `series.prefetch` on and off, against fetching alone and computing alone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from garden.extract import ExtractionPlan, extract
from garden.hub import HubSeries
from garden.series import Prefetcher

# The fake Hub is test support (tests/fakehub.py); the bench serves its series with it too.
FAKEHUB = Path(__file__).resolve().parents[1] / "tests" / "fakehub.py"
sys.path.insert(0, str(FAKEHUB.parent))

HEAD = "embed_out.weight"
FORMATS = ("safetensors", "sharded_safetensors", "bin", "sharded_bin", "12b_like_sharded_bin")
# pythia-12b's layout at small scale: its 36 blocks and vocabulary at a tenth of its width, in three
# `.bin` shards; the head (52 MB) shares the last shard with a third of the blocks, as in 12b.
SMALL_12B = {"vocab_size": 50688, "hidden_size": 512, "num_hidden_layers": 36, "num_attention_heads": 8,
             "intermediate_size": 2048, "rotary_pct": 0.25, "tie_word_embeddings": False}  # fmt: skip


def _state_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def _shards(state: dict[str, torch.Tensor], count: int) -> list[list[str]]:
    """Names in state-dict order cut into `count` shards of about equal bytes (how transformers shards:
    the head, last in the state dict, lands in the last shard beside the last blocks)."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    shards: list[list[str]] = [[]]
    filled = 0
    for name, tensor in state.items():
        if filled >= total * len(shards) / count and len(shards) < count:
            shards.append([])
        shards[-1].append(name)
        filled += tensor.numel() * tensor.element_size()
    return shards


def write_checkpoint(folder: Path, state: dict[str, torch.Tensor], fmt: str, shards: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
        return
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
        return
    parts = _shards(state, shards)
    weight_map = {}
    for i, names in enumerate(parts, start=1):
        part = {name: state[name] for name in names}
        if fmt == "sharded_safetensors":
            filename = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
            save_file(part, str(folder / filename))
        else:
            filename = f"pytorch_model-{i:05d}-of-{len(parts):05d}.bin"
            torch.save(part, folder / filename)
        weight_map |= dict.fromkeys(names, filename)
    index = "model.safetensors.index.json" if fmt == "sharded_safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def small_12b_state(step: int) -> dict[str, torch.Tensor]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    with torch.device("meta"):
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL_12B))
    generator = torch.Generator().manual_seed(step)
    return {
        (HEAD if name == "lm_head.weight" else name): torch.randn(t.shape, generator=generator)
        .mul_(0.02)
        .half()
        for name, t in model.state_dict().items()
    }


def build_format_repos(full_root: Path, hub_root: Path, steps: list[int]) -> None:
    """One repository per layout under `hub_root`, the same pythia-160m-shaped checkpoints in each."""
    for fmt in FORMATS:
        for step in steps:
            folder = hub_root / "bench" / fmt / f"step{step}"
            if folder.exists():
                continue
            if fmt == "safetensors":
                folder.parent.mkdir(parents=True, exist_ok=True)
                folder.symlink_to(full_root / f"step{step}", target_is_directory=True)
            elif fmt == "12b_like_sharded_bin":
                write_checkpoint(folder, small_12b_state(step), "sharded_bin", shards=3)
            else:
                write_checkpoint(folder, _state_of(full_root / f"step{step}" / "model.safetensors"), fmt)


def format_routes(full_root: Path, workdir: Path, steps: list[int]) -> dict:
    """Bytes garden fetches per step for the head, over its bytes, in every layout (fresh caches)."""
    from fakehub import FakeHub

    hub_root = workdir / "hub-formats"
    build_format_repos(full_root, hub_root, steps)
    results = {}
    with FakeHub(hub_root) as hub:
        for fmt in FORMATS:
            cache = Path(tempfile.mkdtemp(prefix="formats-", dir=workdir))
            try:
                series = HubSeries(f"bench/{fmt}", fmt, cache / "garden", cache / "hf", hub.url)
                sent_before = hub.bytes_sent
                tensor_bytes = 0
                for step in steps:
                    tensor = series.read_tensor(step, HEAD)
                    tensor_bytes += tensor.numel() * tensor.element_size()
                results[fmt] = {
                    "bytes_ratio": series.bytes_fetched() / tensor_bytes,
                    "server_bytes_ratio": (hub.bytes_sent - sent_before) / tensor_bytes,
                    "file_bytes_ratio": sum(series.locate(s, HEAD).size for s in steps) / tensor_bytes,
                    "how": sorted(set(series.how.values())),
                    "tensor_mb": tensor_bytes / len(steps) / 1e6,
                }
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    return results


class ThrottledHub:
    """The fake Hub in a process of its own (so that serving does not share the bench's interpreter)."""

    def __init__(self, root: Path, bandwidth: float, latency: float):
        command = [sys.executable, str(FAKEHUB), str(root), "--bandwidth", str(bandwidth), "--latency",
                   str(latency), "--seconds", "1800"]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.url = self.process.stdout.readline().strip()

    def bytes_sent(self) -> int:
        with urllib.request.urlopen(f"{self.url}/_fakehub/stats", timeout=10) as answer:
            return json.load(answer)["bytes_sent"]

    def __enter__(self) -> ThrottledHub:
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def prefetch_routes(full_root: Path, steps: list[int], workdir: Path, bandwidth: float, latency: float,
                    depth: int) -> dict:  # fmt: skip
    """20 steps through a throttled Hub: fetch alone, compute alone, and extract with and without
    fetching ahead, each from fresh caches (compute alone: every tensor already in garden's cache)."""
    hub_root = workdir / "hub-throttled"
    branches = hub_root / "bench" / "pythia-160m-shaped"
    branches.mkdir(parents=True, exist_ok=True)
    for step in steps:
        link = branches / f"step{step}"
        if not link.exists():
            link.symlink_to(full_root / f"step{step}", target_is_directory=True)
    plan = ExtractionPlan(tensor=HEAD, steps=tuple(steps), reference_step=steps[0])
    timings: dict[str, float] = {}

    def fresh(name: str) -> Path:
        folder = workdir / "prefetch" / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    for step in steps:  # the server reads from the page cache in every run, the first included
        with safe_open(str(full_root / f"step{step}" / "model.safetensors"), "pt") as handle:
            handle.get_tensor(HEAD)
    with ThrottledHub(hub_root, bandwidth, latency) as hub:

        def series_in(folder: Path) -> HubSeries:
            return HubSeries("bench/pythia-160m-shaped", "bench", folder / "garden", folder / "hf", hub.url)

        # The Hub keeps each file's sha256; the fake computes it on first use: do that before timing.
        lister = series_in(fresh("list"))
        for step in steps:
            lister.fingerprint(step, HEAD)

        fetch_dir = fresh("fetch")
        series = series_in(fetch_dir)
        started = time.perf_counter()
        for step in steps:  # what extract asks first: each step's file and content id
            series.fingerprint(step, HEAD)
        with Prefetcher(lambda step: series.read_tensor(step, HEAD), steps, depth) as reads:
            for step in steps:
                reads.get(step)
        timings["fetch_only_s"] = time.perf_counter() - started
        timings["fetched_mb"] = series.bytes_fetched() / 1e6

        warm = series_in(fetch_dir)  # every tensor is in garden's cache now: the pass alone
        started = time.perf_counter()
        extract(warm, plan, fresh("compute-extract"), progress=False, prefetch=depth)
        timings["compute_only_s"] = time.perf_counter() - started
        assert warm.bytes_fetched() == 0

        for name, ahead in (("prefetch", depth), ("serial", 0)):
            folder = fresh(name)
            started = time.perf_counter()
            extract(series_in(folder), plan, folder / "extract", progress=False, prefetch=ahead)
            timings[f"{name}_s"] = time.perf_counter() - started
        timings["server_mb"] = hub.bytes_sent() / 1e6
    shutil.rmtree(workdir / "prefetch", ignore_errors=True)
    return timings


if __name__ == "__main__":  # the Hub part alone: python tests/bench_hub.py SERIES_ROOT [WORKDIR]
    root = Path(sys.argv[1])
    work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix="bench-hub-"))
    all_steps = sorted(int(p.name[4:]) for p in root.glob("step*"))
    print(json.dumps(format_routes(root, work, all_steps[:2]), indent=1))
    print(json.dumps(prefetch_routes(root, all_steps, work, 50e6, 0.02, 4), indent=1))
