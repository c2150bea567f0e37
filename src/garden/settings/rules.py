"""What a setting may hold: a rule tests a raw config value and says in words what is valid.

Rules check the value exactly as composed (so `progress=maybe` is named as given, not after a cast);
`convert` turns an accepted value into what the code uses (a list into a tuple, `NULL` into None).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """A setting's type and range; `describe` is what the error says is valid (`words`, or a function
    giving them when they are only known later: a registry's names)."""

    words: str | Callable[[], str]
    accepts: Callable[[object], bool]
    nullable: bool = False
    convert: Callable[[object], object] = lambda value: value
    #: What is wrong with a refused value, where more can be said than the valid range (unknown names).
    explain: Callable[[object], str] | None = None

    @property
    def describe(self) -> str:
        return self.words() if callable(self.words) else self.words

    def allows(self, value: object) -> bool:
        return (value is None and self.nullable) or (value is not None and self.accepts(value))


def _or_null(describe: str, nullable: bool) -> str:
    return describe + (" or null" if nullable else "")


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int, high: int | None = None, nullable: bool = False) -> Rule:
    span = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return Rule(_or_null(span, nullable),
                lambda v: is_integer(v) and v >= low and (high is None or v <= high), nullable)  # fmt: skip


def number(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False,
           nullable: bool = False) -> Rule:  # fmt: skip
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    span = f"a number in {left}{low:g}, {'inf' if high is None else f'{high:g}'}{right}"

    def accepts(v) -> bool:
        if not is_number(v):
            return False
        above = v > low if low_open else v >= low
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    return Rule(_or_null(span, nullable), accepts, nullable, float)


def choice(*values: str, nullable: bool = False) -> Rule:
    return Rule(_or_null(f"one of {', '.join(values)}", nullable), lambda v: v in values, nullable)


def text(describe: str = "a string", nullable: bool = False) -> Rule:
    """A non-empty string; where null is allowed, an empty one (`model.path=`) reads as null."""
    if nullable:
        return Rule(_or_null(describe, True), lambda v: isinstance(v, str), True, lambda v: v or None)
    return Rule(describe, lambda v: isinstance(v, str) and v != "")


def matching(regex: str, describe: str, nullable: bool = False) -> Rule:
    return Rule(_or_null(describe, nullable), lambda v: isinstance(v, str) and bool(re.fullmatch(regex, v)),
                nullable)  # fmt: skip


def list_of(item: Rule, describe: str, *, min_length: int = 0, nullable: bool = False) -> Rule:
    """A list whose every item the item rule accepts, converted to a tuple."""

    def accepts(v) -> bool:
        return isinstance(v, Sequence) and not isinstance(v, str) and len(v) >= min_length and all(
            item.accepts(x) for x in v
        )

    return Rule(_or_null(describe, nullable), accepts, nullable,
                lambda v: tuple(item.convert(x) for x in v))  # fmt: skip


def registered(registry: Callable[[], Sequence[str]], what: str, *, many: bool = False,
               nullable: bool = False, min_length: int = 0) -> Rule:  # fmt: skip
    """A name (or a list of names, `many`) of a registry, read when checked: what registers there is
    imported by then, and the error lists it (and, for a list, which names are unknown)."""

    def describe() -> str:
        valid = ", ".join(registry())
        at_least = f"at least {min_length} " if min_length else ""
        listed = f"a list of {at_least}{what} names from {valid}"
        return _or_null(listed if many else f"one of {valid}", nullable)

    def accepts(v) -> bool:
        if many:
            listed = isinstance(v, Sequence) and not isinstance(v, str) and len(v) >= min_length
            return listed and all(x in registry() for x in v)
        return isinstance(v, str) and v in registry()

    def explain(v) -> str:
        if not (isinstance(v, Sequence) and not isinstance(v, str)):
            return "not a list"
        unknown = [str(x) for x in v if x not in registry()]
        return f"unknown {what}(s): {', '.join(unknown)}" if unknown else f"fewer than {min_length}"

    return Rule(describe, accepts, nullable, (lambda v: tuple(v)) if many else (lambda v: v),
                explain if many else None)  # fmt: skip


def _regex_with_step(v: object) -> bool:
    try:
        return isinstance(v, str) and "step" in re.compile(v).groupindex
    except re.error:
        return False


ANYTHING = Rule("any value", lambda v: True, True)
MAPPING = Rule("a mapping of names to values", lambda v: isinstance(v, dict), True)
BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))
PROBABILITY = number(0.0, 1.0, low_open=True, high_open=True)
POSITIVE = number(0.0, low_open=True)
NONNEGATIVE = number(0.0)
FRACTION = number(0.0, 1.0, low_open=True)
DEVICE = matching(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N")
STEP_REGEX = Rule("a regex with a (?P<step>\\d+) group (and optionally (?P<tokens>\\d+), in billions)",
                  _regex_with_step, nullable=True)  # fmt: skip
HUB_ENDPOINT = Rule("null (HF_ENDPOINT, else the Hub) or an http(s):// URL of a Hub-API server",
                    matching(r"https?://[^\s/]+(/\S*)?", "").accepts, nullable=True)  # fmt: skip


def _unit_axis(v: object) -> object:
    if isinstance(v, str) and v.lower() in ("null", "none"):
        return None
    return v.lower() if isinstance(v, str) else v


UNIT_AXIS = Rule(
    "auto, 0, 1, null",
    lambda v: _unit_axis(v) in ("auto", None) or (is_integer(v) and v in (0, 1)),
    nullable=True,
    convert=_unit_axis,
)
