"""Progress of long loops (the tiny series' training, the extraction pass) reported to whoever listens:
the open MLflow run logs it live (`train/loss`, `extract/...`) while the loops stay free of MLflow."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
