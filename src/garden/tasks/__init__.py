"""Tasks, registered by name: `task=` picks what a job does with its config, and `run(cfg)` dispatches
to it the way `python -m garden` does. `dynamics` analyses a checkpoint series (papers 001 and 002);
`cooccurrence` trains paper 003's synthetic task, then analyses its snapshots as a series; `early_stop`
compares the live monitor's stop rules with validation-loss early stopping on the tiny series."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from garden.settings import Settings, resolve
from garden.tasks import cooccurrence, dynamics, early_stop, scan  # noqa: F401  (they register the tasks)
from garden.tasks.registry import TASKS

log = logging.getLogger("garden")


def task_of(settings: Settings) -> Callable:
    return TASKS.resolve(settings.task)


def run(cfg: DictConfig | Settings, output_dir: Path | None = None):
    """The job `task` names, on the composed config read into Settings (bad input fails here)."""
    settings = cfg if isinstance(cfg, Settings) else resolve(cfg)
    task = task_of(settings)
    log.info("task=%s model=%s variant=%s: checking the input, then opening the series", settings.task,
             settings.model.name, settings.variant)  # fmt: skip
    return task(settings, output_dir)
