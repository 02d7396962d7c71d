"""Declarative validation of the plain-data dataclasses a user writes (recipe tables).

A field's *type* comes from its annotation (``bool``, ``int``, ``float``, ``str``, ``Literal[...]``,
unions of those, ``tuple[X, ...]``, ``Mapping`` and nested dataclasses); what the type cannot say --
allowed values, a numeric range, a custom check, the table a mapping's keys name -- comes from the
field's metadata, written with :func:`rule`::

    samples: int = field(default=128, metadata=rule(lo=1))

:func:`check_fields` checks plain values (a parsed TOML table) against a dataclass before it is built;
:func:`check_instance` checks a built one (``__post_init__``), so presets, programmatic recipes and
command-line flags pass through the same checks. A new field is validated by its annotation alone.

Every failure is a :class:`~onnxq.errors.RecipeError` of one line naming the key, the value as TOML
would write it and what is valid, with a suggestion for a near miss::

    [weights] granularity = 'per-chanel' is not one of 'per-channel', 'per-tensor' (did you mean 'per-channel'?)

Matching is exact (``"Per-Channel"`` is refused, with the suggestion): a recipe means one thing. Booleans
must be TOML booleans (``"yes"`` and ``1`` are refused), integers are not booleans, floats are finite.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, get_args, get_origin, get_type_hints

from onnxq.errors import RecipeError

__all__ = ["Rule", "rule", "check_fields", "check_instance", "suggest", "show"]

_RULE = "onnxq.rule"
_MAX_LISTED = 20  # longer lists of valid values are not spelled out in messages


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field's annotation cannot say. For a ``tuple[X, ...]`` field everything but ``nonempty``
    and ``table`` applies to each element.

    ``choices``: the valid values (or a function returning them, for lists known only at run time);
    ``lo`` / ``hi``: an inclusive numeric range, exclusive at an end whose ``*_open`` is set;
    ``check``: a function returning what is wrong with a value (a phrase such as ``"must be ..."``) or None;
    ``nonempty``: a list must have an element; ``table``: the dataclass whose fields a mapping's keys name.
    """

    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    check: Callable[[Any], str | None] | None = None
    nonempty: bool = False
    table: type | None = None


def rule(**kwargs: Any) -> dict[str, Rule]:
    """Field metadata holding a :class:`Rule`: ``field(default=..., metadata=rule(lo=1))``."""
    return {_RULE: Rule(**kwargs)}


def suggest(value: Any, valid: Iterable[Any]) -> str:
    """`` (did you mean 'x'?)`` for a string close to one of ``valid`` (case ignored), else ``""``."""
    if not isinstance(value, str):
        return ""
    by_lower = {v.lower(): v for v in valid if isinstance(v, str)}
    close = difflib.get_close_matches(value.lower(), list(by_lower), n=1, cutoff=0.7)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def show(value: Any, limit: int = 80) -> str:
    """``value`` as a TOML file would spell it (true, 'text', [1, 2]), cut to ``limit`` characters;
    control characters are escaped (``repr``), never printed raw."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = repr(value)
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(show(v, limit) for v in value) + "]"
    elif isinstance(value, Mapping):
        text = "{ " + ", ".join(f"{_key(k)} = {show(v, limit)}" for k, v in value.items()) + " }"
    elif value is None:
        text = "(none)"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(key: Any) -> str:
    """A table key as TOML writes it: bare when it can be, else quoted (escapes and all)."""
    return key if isinstance(key, str) and key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key) else show(key)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def check_fields(cls: type, values: Mapping[str, Any], label: str) -> None:
    """Raise a RecipeError for the first of ``values`` (field name -> value) that a field of dataclass
    ``cls`` refuses. Names that are not fields are left to the caller (which lists the valid keys).
    ``label`` prefixes the key in messages (``"[weights] "``)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        f = fields.get(key)
        if f is None:
            continue
        problem = _field_problem(f"{label}{key}", value, _hints(cls)[key], f.metadata.get(_RULE, Rule()))
        if problem:
            raise RecipeError(problem)


def check_instance(obj: Any, label: str) -> None:
    """:func:`check_fields` on every field of the dataclass instance ``obj``."""
    check_fields(type(obj), {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, label)


def _members(tp: Any) -> list[Any]:
    """The alternatives of a union type (``bool | Literal["auto"]`` -> [bool, Literal["auto"]])."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        return list(get_args(tp))
    return [tp]


def _is_literal(tp: Any) -> bool:
    return get_origin(tp) is Literal


def _is_list(tp: Any) -> bool:
    return get_origin(tp) is tuple


def _is_mapping(tp: Any) -> bool:
    return get_origin(tp) is Mapping or tp is Mapping


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether ``value`` has type ``tp`` (one member of a union) -- strictly: a bool is no number."""
    if _is_literal(tp):
        return any(type(value) is type(a) and value == a for a in get_args(tp))
    if _is_list(tp):
        return isinstance(value, (list, tuple))
    if _is_mapping(tp):
        return isinstance(value, Mapping)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> list[str]:
    """How a message names the values of type ``tp``."""
    if _is_literal(tp):
        return [show(a) for a in get_args(tp)]
    if tp is bool:
        return ["true", "false"]
    if _is_list(tp):
        return [f"a list of {_plural(get_args(tp)[0])}"]
    if _is_mapping(tp) or dataclasses.is_dataclass(tp):
        return ["a table"]
    return {int: ["an integer"], float: ["a number"], str: ["a string"]}.get(tp, [getattr(tp, "__name__", str(tp))])


def _plural(tp: Any) -> str:
    if _is_literal(tp):
        return "values " + ", ".join(_describe(tp))
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(tp, "tables")


def _either(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _unquote_hint(value: Any, members: list[Any]) -> str:
    """A hint for a quoted boolean or number (``"true"``, ``"5"``) where the field wants the real thing."""
    if not isinstance(value, str):
        return ""
    text = value.strip().lower()
    if bool in members and text in ("true", "false"):
        return f" (write {text} without quotes)"
    if int in members or float in members:
        try:
            float(text)
        except ValueError:
            return ""
        return f" (write {value.strip()} without quotes)"
    return ""


def _field_problem(name: str, value: Any, tp: Any, r: Rule) -> str | None:
    """The message for ``name = value`` if field type ``tp`` with rule ``r`` refuses it, else None."""
    members = _members(tp)
    kind = next((m for m in members if _type_ok(value, m)), None)
    literals = [a for m in members if _is_literal(m) for a in get_args(m)]
    if kind is None:
        return f"{name} = {show(value)} {_type_problem(value, members)}"
    if _is_literal(kind):
        return None
    if _is_list(kind):
        return _list_problem(name, value, get_args(kind)[0], r)
    if _is_mapping(kind) and r.table is not None:
        return _table_problem(name, value, r.table)
    if kind is type(None) or dataclasses.is_dataclass(kind) or _is_mapping(kind):
        return None
    problem = _value_problem(value, r, literals)
    return f"{name} = {show(value)} {problem}" if problem else None


def _type_problem(value: Any, members: list[Any]) -> str:
    """Why ``value`` has none of the types ``members``."""
    shown = [m for m in members if m is not type(None)]
    valid_strings = [a for m in shown if _is_literal(m) for a in get_args(m)]
    hint = suggest(value, valid_strings) or _unquote_hint(value, shown)
    if all(_is_literal(m) for m in shown):
        return f"is not one of {', '.join(w for m in shown for w in _describe(m))}{hint}"
    return f"must be {_either([w for m in shown for w in _describe(m)])}{hint}"


def _list_problem(name: str, value: Sequence[Any], element: Any, r: Rule) -> str | None:
    if r.nonempty and not value:
        return f"{name} = [] must not be empty"
    for item in value:
        if not _type_ok(item, element):
            return f"{name} entry {show(item)} must be {_either(_describe(element))}{_unquote_hint(item, [element])}"
        problem = _value_problem(item, r, [])
        if problem:
            return f"{name} entry {show(item)} {problem}"
    return None


def _table_problem(name: str, value: Mapping[str, Any], table: type) -> str | None:
    valid = [f.name for f in dataclasses.fields(table)]
    for key in value:
        if key not in valid:
            return f"unknown key {show(key)} in {name}; valid keys: {', '.join(valid)}{suggest(key, valid)}"
    try:
        check_fields(table, value, f"{name}.")
    except RecipeError as exc:
        return str(exc)
    return None


def _value_problem(value: Any, r: Rule, literals: list[Any]) -> str | None:
    """What ``r`` (choices, range, check) refuses in a value of the right type; ``literals`` are the
    field's other valid values (``"auto"``), named in a range message."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if r.choices is not None:
        choices = list(r.choices() if callable(r.choices) else r.choices)
        if not any(type(value) is type(c) and value == c for c in choices):
            listed = ", ".join(show(c) for c in choices) if len(choices) <= _MAX_LISTED else f"{len(choices)} names"
            return f"is not one of {listed}{suggest(value, choices)}"
    if (r.lo is not None or r.hi is not None) and not _in_range(value, r):
        other = "".join(f" or {show(a)}" for a in literals)
        return f"must be {_range_text(r)}{other}"
    return r.check(value) if r.check is not None else None


def _in_range(x: float, r: Rule) -> bool:
    above = r.lo is None or (x > r.lo if r.lo_open else x >= r.lo)
    below = r.hi is None or (x < r.hi if r.hi_open else x <= r.hi)
    return above and below


def _range_text(r: Rule) -> str:
    if r.lo is not None and r.hi is not None:
        return f"in {'(' if r.lo_open else '['}{r.lo:g}, {r.hi:g}{')' if r.hi_open else ']'}"
    if r.lo is not None:
        return f"{'>' if r.lo_open else '>='} {r.lo:g}"
    return f"{'<' if r.hi_open else '<='} {r.hi:g}"
