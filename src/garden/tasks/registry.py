"""The task registry: `task=` names what a job does; each task registers its job function here."""

from __future__ import annotations

from collections.abc import Callable

from garden.registry import Registry

#: task name -> the job: run(cfg, output_dir) -> its outcome (RunOutcome, or None when nothing is analysed)
TASKS: Registry[Callable] = Registry("task", "task")
register = TASKS.register
