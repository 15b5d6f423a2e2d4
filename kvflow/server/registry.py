"""Named implementations chosen by a command-line flag (--tool-call-parser,
--reasoning-parser): each module registers its own under a name, and a name the registry
lacks is refused with the names it has."""
from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, flag: str) -> None:
        self.flag = flag
        self._makers: dict[str, Callable[[], T]] = {}

    def add(self, name: str, maker: Callable[[], T]) -> None:
        self._makers[name] = maker

    def names(self) -> list[str]:
        return sorted(self._makers)

    def create(self, name: str) -> T:
        if name not in self._makers:
            raise ValueError(f"{self.flag} {name!r} is not one of {', '.join(self.names())}")
        return self._makers[name]()
