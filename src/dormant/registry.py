"""Small decorator registries: names are resolved at the boundary, unknown names list the
valid ones."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator


class UnknownNameError(KeyError):
    """An unknown registry name; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain sentence
        return str(self.args[0])


class Registry:
    """A named collection of constructors/functions::

        MODELS = Registry("model")
        @MODELS.register("mlp")
        def mlp(...): ...
        MODELS.get("mlp")

    A class that carries its own ``name`` registers under it with the bare decorator
    (``@METHODS.register``); `scoped` undoes every registration made inside it (tests).
    """

    def __init__(self, kind: str, plural: str | None = None):
        self.kind = kind
        self.plural = plural or kind + "s"
        self._items: dict[str, Callable] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str | Callable, help: str | None = None) -> Callable:
        if not isinstance(name, str):        # bare @register on an object with a .name
            obj = name
            if not isinstance(getattr(obj, "name", None), str):
                raise TypeError(f"@{self.kind} registry: {obj!r} has no `name` to register "
                                "under: use @register('its-name')")
            return self.register(obj.name, help)(obj)

        def deco(obj: Callable) -> Callable:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            doc = help or " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split())
            self._help[name] = doc
            return obj
        return deco

    def get(self, name: str) -> Callable:
        if not isinstance(name, str) or name not in self._items:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(self.names())}")
        return self._items[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self) -> dict[str, str]:
        return {n: self._help[n] for n in self.names()}

    @contextlib.contextmanager
    def scoped(self) -> Iterator["Registry"]:
        """Registrations made inside the block are gone after it (tests register their own
        methods, models, ... without leaking them into the next test)."""
        items, helps = dict(self._items), dict(self._help)
        try:
            yield self
        finally:
            self._items, self._help = items, helps

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
