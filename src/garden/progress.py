"""Progress of long loops (the tiny series' training, the extraction pass) reported to whoever listens:
the open MLflow run logs it live (`train/loss`, `system/extract_...`) while the loops stay free of MLflow; and
the loops' progress bars, drawn on a terminal and logged in a few lines anywhere else (`bar`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

#: A listener gets (what is progressing, its step, the values at that step).
Listener = Callable[[str, int, dict[str, float]], None]

_listeners: list[Listener] = []


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call `listener` with every report made while the block runs (in this process)."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def report(kind: str, step: int, values: dict[str, float]) -> None:
    """A loop's progress at `step` (`kind`: "train", "extract"); nothing when nobody listens."""
    for listener in list(_listeners):
        listener(kind, step, values)


#: A bar not on a terminal logs a line at each of these fractions of its loop (and at least this often),
#: but before the end only once the loop has run QUIET_SECONDS: a loop over cached records that ends at
#: once says so in one line, not four.
LOGGED_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
LOGGED_EVERY_SECONDS = 120.0
QUIET_SECONDS = 3.0


def bar(iterable: Iterable | None = None, *, desc: str, unit: str, enabled: bool = True,
        total: int | None = None, initial: int = 0, **options):  # fmt: skip
    """A progress bar (tqdm) where a person watches a terminal; elsewhere (a log file, a cluster job's
    output, a pipe) a few lines through the `garden` logger instead of a redraw per update, which would
    fill the file with carriage-return frames. `enabled=False` (progress=false) shows nothing."""
    import sys

    if enabled and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, **options)
    return LoggedBar(iterable, desc, unit, enabled, total, initial)


class LoggedBar:
    """The part of tqdm's interface garden's loops use, reporting in a few log lines (`bar`)."""

    def __init__(self, iterable: Iterable | None, desc: str, unit: str, enabled: bool, total: int | None,
                 initial: int = 0):  # fmt: skip
        import logging
        import time

        self.iterable, self.desc, self.unit, self.enabled = iterable, desc, unit, enabled
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable) + initial
        self.total, self.n, self.postfix = total, initial, ""
        self._log, self._clock = logging.getLogger("garden"), time.monotonic
        self._started = self._last = self._clock()
        self._next = 0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        due = self._clock() - self._last >= LOGGED_EVERY_SECONDS
        crossed = False
        fractions = LOGGED_FRACTIONS
        while self.total and self._next < len(fractions) and self.n >= fractions[self._next] * self.total:
            self._next += 1
            crossed = True
        finished = bool(self.total) and self.n >= self.total
        if (crossed and (finished or self._clock() - self._started >= QUIET_SECONDS)) or due:
            self._say()

    def _say(self) -> None:
        self._last = self._clock()
        seconds = self._last - self._started
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        extra = f", {self.postfix}" if self.postfix else ""
        self._log.info("%s: %s %ss in %.0f s%s", self.desc, done, self.unit, seconds, extra)

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**(ordered_dict or {}), **values}.items())

    def close(self) -> None:
        """Nothing to let go: the lines are logged as the loop goes."""

    def __enter__(self) -> LoggedBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
