"""Checkpoint schedules (Pythia's and scaled copies of it) and the step selections of conf/steps/."""

from __future__ import annotations

from collections.abc import Sequence

from garden.errors import GardenError

STEP_SELECTIONS = ("all", "eval", "every", "list")


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
