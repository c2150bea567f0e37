"""Checkpoint schedules (Pythia's and scaled copies of it) and the step selections of conf/steps/, which
work on any series' steps."""

from __future__ import annotations

import math
from collections.abc import Sequence

from garden.errors import GardenError

STEP_SELECTIONS = ("all", "eval", "every", "list", "log")


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


def select_steps(available: Sequence[int], selection: dict) -> list[int]:
    """Apply a conf/steps/ selection to the steps a series has; errors name what is valid."""
    available = sorted(available)
    if not available:
        raise GardenError("the series has no checkpoints")
    kind = selection.get("select")
    if kind == "all":
        chosen = list(available)
    elif kind == "eval":
        chosen = eval_subset(available)
    elif kind == "every":
        stride = selection.get("stride")
        if not isinstance(stride, int) or stride < 1:
            raise GardenError(f"steps.stride must be a positive integer, got {stride!r}")
        chosen = sorted(set(available[::stride]) | {available[-1]})
    elif kind == "list":
        values = selection.get("values")
        if not values:
            raise GardenError("steps=list needs steps.values, e.g. steps.values=[0,1000,143000]")
        try:
            wanted = sorted({int(v) for v in values})
        except (TypeError, ValueError) as err:
            raise GardenError(f"steps.values must be integers, got {list(values)!r}") from err
        missing = [s for s in wanted if s not in set(available)]
        if missing:
            raise GardenError(
                f"steps {missing} are not in the series; it has {len(available)} steps: "
                f"{_abbreviate(available)}"
            )
        chosen = wanted
    elif kind == "log":
        count = selection.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 2:
            raise GardenError(f"steps.count must be an integer >= 2, got {count!r}")
        chosen = log_subset(available, count)
    else:
        raise GardenError(f"unknown step selection {kind!r}; valid: {', '.join(STEP_SELECTIONS)}")
    if len(chosen) < 2:
        raise GardenError(f"the step selection keeps {chosen}; dynamics need at least two checkpoints")
    return chosen


def _abbreviate(steps: Sequence[int], keep: int = 8) -> str:
    if len(steps) <= 2 * keep:
        return str(list(steps))
    head = ", ".join(map(str, steps[:keep]))
    tail = ", ".join(map(str, steps[-keep:]))
    return f"[{head}, ..., {tail}]"
