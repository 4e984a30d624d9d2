"""A small name -> factory registry shared by models, attacks and data sets."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from robustlab.errors import RobustlabError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps stable names to objects (classes or factory functions) of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")``. Names are lower case and unique."""

        def add(obj: T) -> T:
            key = name.lower()
            if key in self._items:
                raise KeyError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        key = name.lower()
        if key not in self._items:
            known = ", ".join(sorted(self._items)) or "none"
            raise RobustlabError(f"unknown {self.kind} {name!r}; known: {known}")
        return self._items[key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
