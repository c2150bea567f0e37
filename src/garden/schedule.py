"""Checkpoint schedules (Pythia's and scaled copies of it) and the step selections of conf/steps/, which
work on any series' steps."""

from __future__ import annotations

import math
from collections.abc import Sequence

from garden.errors import GardenError
from garden.settings import StepSettings


def log_linear_schedule(interval: int, total: int) -> list[int]:
    """Pythia's shape: step 0, the powers of two below `interval`, then every `interval` up to `total`."""
    log_steps = [0]
    power = 1
    while power < interval:
        log_steps.append(power)
        power *= 2
    return log_steps + list(range(interval, total + 1, interval))


PYTHIA_STEPS: tuple[int, ...] = tuple(log_linear_schedule(1000, 143000))


def eval_subset(steps: Sequence[int]) -> list[int]:
    """The log-spaced steps, the first evenly spaced step, every 10th from the third, and the last.

    On Pythia's 154 steps this is EleutherAI's 27-step evaluation subset (0, 1, 2, ..., 512, 1000,
    3000, 13000, ..., 143000); on a scaled schedule it is the same shape.
    """
    steps = sorted(steps)
    if len(steps) < 3:
        return list(steps)
    interval = steps[-1] - steps[-2]
    first_linear = len(steps) - 1
    while first_linear > 0 and steps[first_linear] - steps[first_linear - 1] == interval:
        first_linear -= 1
    log_part, linear = steps[:first_linear], steps[first_linear:]
    # The final checkpoint is always kept (it is Pythia's last eval step, and CKA's reference).
    return sorted(set(log_part + linear[:1] + linear[2::10] + linear[-1:]))


def log_subset(steps: Sequence[int], count: int) -> list[int]:
    """`count` steps spaced evenly in log(step) from the first positive step to the last (step 0 kept
    when the series has it): the same density per decade on any schedule, Pythia's 154 steps from 0 or
    OLMo-2's hundreds of branches from step 1000. Each target takes the nearest step not yet taken, so
    exactly `count` come back whenever the series has that many."""
    steps = sorted(set(steps))
    if len(steps) <= count:
        return steps
    chosen = [0] if steps[0] == 0 else []
    positive = [s for s in steps if s > 0]
    wanted = count - len(chosen)
    low, high = math.log(positive[0]), math.log(positive[-1])
    free = list(positive)
    for i in range(wanted):
        target = low + (high - low) * i / max(wanted - 1, 1)
        nearest = min(free, key=lambda s: (abs(math.log(s) - target), s))
        free.remove(nearest)
        chosen.append(nearest)
    return sorted(chosen)


def select_steps(available: Sequence[int], selection: StepSettings) -> list[int]:
    """Apply a step selection (`steps.*`, checked by the schema) to the steps a series has."""
    available = sorted(available)
    if not available:
        raise GardenError("the series has no checkpoints")
    if selection.select == "all":
        chosen = list(available)
    elif selection.select == "eval":
        chosen = eval_subset(available)
    elif selection.select == "every":
        chosen = sorted(set(available[:: selection.stride]) | {available[-1]})
    elif selection.select == "list":
        if not selection.values:
            raise GardenError("steps=list needs steps.values, e.g. steps.values=[0,1000,143000]")
        wanted = sorted(set(selection.values))
        missing = [s for s in wanted if s not in set(available)]
        if missing:
            raise GardenError(
                f"steps {missing} are not in the series; it has {len(available)} steps: "
                f"{_abbreviate(available)}"
            )
        chosen = wanted
    else:  # log
        chosen = log_subset(available, selection.count)
    if len(chosen) < 2:
        raise GardenError(f"the step selection keeps {chosen}; dynamics need at least two checkpoints")
    return chosen


def _abbreviate(steps: Sequence[int], keep: int = 8) -> str:
    if len(steps) <= 2 * keep:
        return str(list(steps))
    head = ", ".join(map(str, steps[:keep]))
    tail = ", ".join(map(str, steps[-keep:]))
    return f"[{head}, ..., {tail}]"
