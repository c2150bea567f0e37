"""Tasks, registered by name: `task=` picks what a job does with its config, and `run(cfg)` dispatches
to it the way `python -m garden` does. `dynamics` analyses a checkpoint series (papers 001 and 002);
`cooccurrence` trains paper 003's synthetic task, then analyses its snapshots as a series."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from garden.tasks import cooccurrence, dynamics  # noqa: F401  (they register the tasks)
from garden.tasks.registry import TASKS


def task_of(cfg: DictConfig) -> Callable:
    return TASKS.resolve(cfg.get("task", "dynamics"))


def run(cfg: DictConfig, output_dir: Path | None = None):
    """The job `cfg.task` names."""
    return task_of(cfg)(cfg, output_dir)
