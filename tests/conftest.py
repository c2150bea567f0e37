"""Shared helpers: in-memory series, series written to disk in each layout, a composed config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

from garden.config import config_dir
from garden.series import CheckpointSeries


class ArraySeries(CheckpointSeries):
    """A series held in memory: {step: {name: tensor}}; counts reads so tests can see recomputation."""

    def __init__(self, tensors: dict[int, dict[str, torch.Tensor]], fail_at: int | None = None):
        self.tensors = tensors
        self.identity = f"memory:{id(self)}"
        self.label = "memory"
        self.reads: list[int] = []
        self.fail_at = fail_at

    def steps(self) -> list[int]:
        return sorted(self.tensors)

    def tensor_names(self, step: int) -> list[str]:
        return sorted(self.tensors[step])

    def read_tensor(self, step: int, name: str) -> torch.Tensor:
        if self.fail_at is not None and step == self.fail_at:
            raise KeyboardInterrupt(f"simulated interruption at step {step}")
        self.reads.append(step)
        return self.tensors[step][name]

    def fingerprint(self, step: int, tensor: str) -> str:
        return f"{step}:{float(self.tensors[step][next(iter(self.tensors[step]))].double().sum()):.17g}"


def random_walk(
    steps: list[int], shape: tuple[int, ...], rate: float, seed: int = 0
) -> dict[int, torch.Tensor]:
    """w(t) = w(0) + N(0, rate) increments per training step, so E[MSD(t)] = rate * t."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.02
    out, previous = {}, 0
    for step in steps:
        gap = step - previous
        if gap > 0:
            w = w + torch.randn(shape, generator=gen, dtype=torch.float64) * np.sqrt(rate * gap)
        out[step] = w.float().clone()
        previous = step
    return out


def planted_fork(steps: list[int], onset: int, n: int = 20000, seed: int = 0) -> dict[int, torch.Tensor]:
    """Unimodal noise that splits into two branches (+/-) from `onset` on, widening with time."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, generator=gen) * 0.05
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    out = {}
    for step in steps:
        split = 0.3 * (1 + np.log1p(step - onset)) if step >= onset else 0.0
        jitter = torch.randn(n, generator=gen) * 0.01
        out[step] = (noise + jitter + signs * split).float()
    return out


def unit_series(
    steps: list[int],
    units: int = 64,
    length: int = 2048,
    rate: float = 1e-5,
    seed: int = 0,
    forking_units: int = 0,
    fork_step: int | None = None,
    fork_share: float = 0.12,
    gap: float = 6.0,
    every_entry: bool = False,
) -> dict[int, torch.Tensor]:
    """[length, units] weights diffusing at `rate` per step (a unit is a column). From `fork_step` on,
    in each of the first `forking_units` units a seeded `fork_share` of its entries sits `gap` x the
    tensor's spread away (a second mode); with `every_entry`, every entry of every unit moves +/- gap."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(length, units, generator=gen, dtype=torch.float64) * 0.02
    leaves = torch.rand(length, units, generator=gen) < fork_share
    leaves[:, forking_units:] = False
    signs = torch.where(torch.rand(length, units, generator=gen) < 0.5, -1.0, 1.0)
    out, previous = {}, 0
    for step in steps:
        if step > previous:
            w = w + torch.randn(length, units, generator=gen, dtype=torch.float64) * np.sqrt(
                rate * (step - previous)
            )
        x = w.clone()
        if fork_step is not None and step >= fork_step:
            offset = gap * float(w.std())
            x = x + (signs * offset if every_entry else leaves * offset)
        out[step] = x.float()
        previous = step
    return out


def write_series(
    root: Path,
    tensors: dict[int, dict[str, torch.Tensor]],
    layout: str = "safetensors",
    config: dict | None = None,
) -> Path:
    """Write {step: {name: tensor}} as step{N}/ folders in one of the four Hugging Face layouts."""
    root.mkdir(parents=True, exist_ok=True)
    for step, state in tensors.items():
        folder = root / f"step{step}"
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in state.items()}
        names = sorted(state)
        if layout == "safetensors":
            save_file(state, folder / "model.safetensors")
        elif layout == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        elif layout in ("sharded_safetensors", "sharded_bin"):
            halves = [names[: len(names) // 2 or 1], names[len(names) // 2 or 1 :]]
            halves = [h for h in halves if h]
            weight_map = {}
            for i, part in enumerate(halves, start=1):
                if layout == "sharded_safetensors":
                    filename = f"model-{i:05d}-of-{len(halves):05d}.safetensors"
                    save_file({k: state[k] for k in part}, folder / filename)
                else:
                    filename = f"pytorch_model-{i:05d}-of-{len(halves):05d}.bin"
                    torch.save({k: state[k] for k in part}, folder / filename)
                weight_map.update({k: filename for k in part})
            index = (
                "model.safetensors.index.json"
                if layout == "sharded_safetensors"
                else "pytorch_model.bin.index.json"
            )
            (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        else:
            raise ValueError(layout)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def neox_state(
    step_tensor: torch.Tensor, n_layers: int = 2, d: int = 8, vocab: int = 16
) -> dict[str, torch.Tensor]:
    """A GPT-NeoX-named state dict whose embed_out is the given tensor (other tensors small and fixed)."""
    state = {"gpt_neox.embed_in.weight": torch.zeros(vocab, d), "embed_out.weight": step_tensor}
    for i in range(n_layers):
        prefix = f"gpt_neox.layers.{i}."
        state[prefix + "attention.query_key_value.weight"] = torch.full((3 * d, d), float(i))
        state[prefix + "attention.dense.weight"] = torch.ones(d, d)
        state[prefix + "mlp.dense_h_to_4h.weight"] = torch.ones(4 * d, d)
        state[prefix + "mlp.dense_4h_to_h.weight"] = torch.arange(4 * d * d, dtype=torch.float32).reshape(
            d, 4 * d
        )
    return state


@pytest.fixture
def compose_config():
    """Compose the real config tree with overrides (Hydra's compose API, no app run)."""

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _compose


@pytest.fixture
def compose_settings(compose_config):
    """The composed config read into Settings (garden.settings.resolve), as a job starts."""
    from garden.settings import resolve

    return lambda *overrides: resolve(compose_config(*overrides))


WORDS = (
    "the king and the queen walk in the garden of forking paths while the fool sings of rain "
    "and the lords argue over crowns swords letters and the long night"
).split()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A few kB of English-like lines: enough to train and evaluate a shrunken tiny series fast."""
    import random

    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(400)]
        (folder / f"part{i}.txt").write_text("\n".join(lines))
    return folder


def run_garden(workdir: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m garden` as a user runs it, with its MLflow store, data and outputs inside `workdir`
    (flags such as `-m` go first, as Hydra's command line wants them)."""
    flags = [o for o in overrides if o.startswith("-")]
    overrides = tuple(o for o in overrides if not o.startswith("-"))
    command = [
        sys.executable, "-m", "garden", *flags, "progress=false", f"tracking.uri=sqlite:///{workdir}/mlflow.db",
        f"paths.data_dir={workdir}/data", f"hydra.run.dir={workdir}/out", *overrides,
    ]  # fmt: skip
    return subprocess.run(command, cwd=workdir, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


# The tiny model and its training shrunk to seconds (the CLI end-to-end tests train it for real).
SHRUNK_TINY = [
    "model.architecture.vocab_size=300", "model.architecture.hidden_size=32",
    "model.architecture.num_hidden_layers=2", "model.architecture.num_attention_heads=2",
    "model.architecture.intermediate_size=64", "model.train.steps=40", "model.train.interval=8",
    "model.train.batch_size=4", "model.train.seq_len=16",
]  # fmt: skip
