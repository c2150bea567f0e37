"""Tasks, registered by name: `task=` picks what a job does with its config, and `run(cfg)` dispatches
to it the way `python -m garden` does. `dynamics` analyses a checkpoint series (papers 001 and 002);
`cooccurrence` trains paper 003's synthetic task, then analyses its snapshots as a series."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from garden.errors import GardenError

#: task name -> the job: run(cfg, output_dir) -> its outcome (RunOutcome, or None when nothing is analysed)
TASKS: dict[str, Callable] = {}


def register(name: str):
    def decorate(job: Callable):
        TASKS[name] = job
        return job

    return decorate


def task_of(cfg: DictConfig) -> Callable:
    name = cfg.get("task", "dynamics")
    if name not in TASKS:
        raise GardenError(f"task={name!r} is not valid; valid: {', '.join(TASKS)}")
    return TASKS[name]


def run(cfg: DictConfig, output_dir: Path | None = None):
    """The job `cfg.task` names."""
    return task_of(cfg)(cfg, output_dir)


from garden.tasks import cooccurrence, dynamics  # noqa: E402,F401  (registers the tasks)
