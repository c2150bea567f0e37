"""One shape for every registry (metrics, model families, checkpoint sources, tasks, evaluation stages).

A registry maps names to what they name, in the order they were registered. Each lives in a small module
of its own (`garden.metrics.registry`, ...), so that its package imports the modules that register into
it at the top. Registering a name twice is a programming error (ValueError at import); asking for an
unknown name is a user's error (GardenError naming the setting and the valid names).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Generic, TypeVar

from garden.errors import GardenError

T = TypeVar("T")
F = TypeVar("F")


class Registry(MutableMapping[str, T], Generic[T]):
    """Names -> items of one kind; `setting` is the config key users choose them with."""

    def __init__(self, what: str, setting: str):
        self.what = what
        self.setting = setting
        self._items: dict[str, T] = {}

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __setitem__(self, name: str, item: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._items[name] = item

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def register(self, name: str, make: Callable[[F], T] | None = None) -> Callable[[F], F]:
        """A decorator adding what it decorates under `name` (or `make(decorated)` when given)."""

        def decorate(target: F) -> F:
            self[name] = make(target) if make is not None else target  # type: ignore[assignment]
            return target

        return decorate

    def valid(self) -> str:
        return ", ".join(self._items)

    def resolve(self, name: object) -> T:
        """The item named, or a GardenError naming the setting and the valid names."""
        if not isinstance(name, str) or name not in self._items:
            raise GardenError(f"{self.setting}={name!r} is not valid; valid: one of {self.valid()}")
        return self._items[name]

    def check(self, names: Iterable[str]) -> list[str]:
        """The names as a list, each registered (else a GardenError listing the unknown and the valid)."""
        names = list(names)
        unknown = [n for n in names if n not in self._items]
        if unknown:
            raise GardenError(f"{self.setting}: unknown {self.what}(s) {unknown}; valid: {self.valid()}")
        return names
