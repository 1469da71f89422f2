"""Typed options: each method declares its options once, as a dataclass of `option` fields
(type, default, one-line help, valid range or choices). The Python call, the command line's
``--method-args`` and YAML configs are all checked through it, once, before anything trains:

    @dataclass
    class Options(MethodOptions):
        factor: float = option(0.05, "quantile below which weights go", within=(0, 1))

    Options.parse("synaptic-stripping", {"factor": "abc"})
    # OptionError: synaptic-stripping: factor: expected a float in (0, 1), got 'abc'
"""
from __future__ import annotations

import collections.abc as cabc
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

__all__ = ["OptionError", "Options", "option", "describe_type"]


class OptionError(ValueError):
    """An option value or name a method does not accept (raised before training)."""


def option(default: Any, help: str, *, within: tuple | None = None, bounds: str = "()",
           at_least: float | None = None, choices: Sequence | None = None,
           python_only: bool = False) -> Any:
    """A dataclass field with its help and its valid values.

    within=(lo, hi) with bounds "()", "[]", "(]" or "[)"; at_least=lo (inclusive);
    choices=(...) for strings; python_only for values the command line cannot give (objects).
    """
    meta = {"help": help, "within": within, "bounds": bounds, "at_least": at_least,
            "choices": tuple(choices) if choices is not None else None,
            "python_only": python_only}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# -- types -----------------------------------------------------------------------------------
_SEQUENCES = (tuple, list, cabc.Sequence)
_MAPPINGS = (dict, cabc.Mapping)


def _args(t) -> tuple:
    return typing.get_args(t)


def _is_union(t) -> bool:
    return typing.get_origin(t) in (typing.Union, types.UnionType)


def describe_type(t) -> str:
    """A type as users read it: 'float', 'int or None', 'list of str'."""
    if t is type(None):
        return "None"
    if _is_union(t):
        return " or ".join(describe_type(a) for a in _args(t))
    origin = typing.get_origin(t)
    if origin in _SEQUENCES:
        inner = [a for a in _args(t) if a is not Ellipsis]
        return f"list of {describe_type(inner[0])}" if inner else "list"
    if origin in _MAPPINGS:
        k, v = _args(t) or (Any, Any)
        return f"mapping of {describe_type(k)} to {describe_type(v)}"
    return getattr(t, "__name__", str(t))


def _scalar_ok(value: Any, t) -> bool:
    """Whether `value` is acceptable for the plain type `t` as it is (int -> float aside)."""
    plain = not isinstance(value, bool)
    return {type(None): value is None, bool: isinstance(value, bool),
            int: isinstance(value, int) and plain,
            float: isinstance(value, (int, float)) and plain and math.isfinite(value),
            str: isinstance(value, str)}.get(t, isinstance(t, type) and isinstance(value, t))


def _convert_union(value: Any, t) -> Any:
    for a in _args(t):
        try:
            return _convert(value, a)
        except TypeError:
            continue
    raise TypeError


def _convert_container(value: Any, t, origin) -> Any:
    if origin in _SEQUENCES:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise TypeError
        inner = [a for a in _args(t) if a is not Ellipsis]
        return tuple(_convert(v, inner[0]) for v in value) if inner else tuple(value)
    if not isinstance(value, Mapping):
        raise TypeError
    k, v = _args(t) or (Any, Any)
    return {_convert(a, k): _convert(b, v) for a, b in value.items()}


def _convert(value: Any, t) -> Any:
    """`value` as type `t`, or raise TypeError. int -> float is allowed, bool -> int is not."""
    if _is_union(t):
        return _convert_union(value, t)
    if t is Any:
        return value
    origin = typing.get_origin(t)
    if origin in _SEQUENCES or origin in _MAPPINGS:
        return _convert_container(value, t, origin)
    if not _scalar_ok(value, t):
        raise TypeError
    return float(value) if t is float else value


def _range_text(meta: Mapping) -> str:
    if meta["choices"] is not None:
        return f" (one of {', '.join(map(str, meta['choices']))})"
    if meta["within"] is not None:
        lo, hi = meta["within"]
        b = meta["bounds"]
        return f" in {b[0]}{lo:g}, {hi:g}{b[1]}"
    if meta["at_least"] is not None:
        return f" >= {meta['at_least']:g}"
    return ""


def _in_range(value: Any, meta: Mapping) -> bool:
    if value is None or not isinstance(value, (int, float, str)) or isinstance(value, bool):
        return True
    if meta["choices"] is not None:
        return value in meta["choices"]
    if isinstance(value, str):
        return True
    if meta["within"] is not None:
        lo, hi = meta["within"]
        b = meta["bounds"]
        ok_lo = value > lo if b[0] == "(" else value >= lo
        ok_hi = value < hi if b[1] == ")" else value <= hi
        return ok_lo and ok_hi
    if meta["at_least"] is not None:
        return value >= meta["at_least"]
    return True


# -- the options base ------------------------------------------------------------------------
@dataclass
class Options:
    """Base of every options dataclass. Subclasses declare `option` fields and may add
    `check(self, owner)` for rules that tie several options together."""

    @classmethod
    def hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def parse(cls, owner: str, values: Mapping[str, Any]) -> "Options":
        """Options from a mapping of names to values, each converted and checked; unknown
        names and bad values raise `OptionError` naming the option, its type and range."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise OptionError(f"{owner} has no option(s) {unknown}; valid: {sorted(names)} "
                              f"(`dormant help {owner}` lists them with their types)")
        hints, out = cls.hints(), {}
        for f in fields(cls):
            if f.name not in values:
                continue
            value = values[f.name]
            expect = f"{_article(describe_type(hints[f.name]))}{_range_text(f.metadata)}"
            try:
                converted = _convert(value, hints[f.name])
            except TypeError:
                raise OptionError(f"{owner}: {f.name}: expected {expect}, got {value!r}") from None
            if not _in_range(converted, f.metadata):
                raise OptionError(f"{owner}: {f.name}: expected {expect}, got {value!r}")
            out[f.name] = converted
        opts = cls(**out)
        opts.check(owner)
        return opts

    def check(self, owner: str) -> None:
        """Rules between options (override); raise OptionError."""

    def changed(self) -> dict[str, Any]:
        """The options that differ from their defaults."""
        base = type(self)()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(base, f.name)}

    @classmethod
    def describe(cls) -> list[tuple[str, str, str, str]]:
        """(name, type with range, default, help) for every option, in declaration order."""
        hints, rows = cls.hints(), []
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            typ = describe_type(hints[f.name]) + _range_text(f.metadata)
            if f.metadata.get("python_only"):
                typ += "; Python only"
            rows.append((f.name, typ, repr(default), f.metadata.get("help", "")))
        return rows


def _article(text: str) -> str:
    return ("an " if text[:1] in "aeiou" else "a ") + text

