"""One helper per kind of input check, used at the edges that validate what they are given: the settings
objects in their constructors (`cascade.config`, `cascade.training.trainer_config`, ...) and the public entry
points of the library. The `check_*` helpers raise ValueError with one line naming the setting, what it must be,
and what it got; the `is_*` predicates let a caller raise its own one-line message."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def is_int(value: Any) -> bool:
    """Whether ``value`` is a Python int and not a bool (True and False are ints to Python, but not counts)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_int_at_least(value: Any, low: int) -> bool:
    """Whether ``value`` is an integer >= ``low`` (not a bool, which is an int to Python but not a count)."""
    return is_int(value) and value >= low


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number: an int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_auto_or_bool(value: Any) -> bool:
    """Whether ``value`` is "auto", True or False (not 1 or 0, which compare equal to True and False but are
    not booleans)."""
    return value == "auto" or isinstance(value, bool)


def check_num_workers(num_workers: Any) -> None:
    """``data.num_workers`` is ``"auto"`` or an integer >= 0."""
    if num_workers != "auto" and not is_int_at_least(num_workers, 0):
        raise ValueError(f"data.num_workers must be auto or an integer >= 0, got {num_workers!r}")


def check_known_keys(cls: type, d: Any, prefix: str) -> None:
    """``d`` is a dict whose keys are all fields of the dataclass ``cls``; ``prefix`` ("unet.", "" at the top)
    names the section in the message. Raises TypeError for a non-dict, ValueError naming the unknown keys."""
    if not isinstance(d, dict):
        raise TypeError(f"{prefix or 'stage config'} must be a dict, got {type(d).__name__}")
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} key(s) {[prefix + k for k in unknown]}; valid: {sorted(valid)}"
        )


def check_int_range(name: str, value: Any, low: int, high: int) -> None:
    """``value`` is an integer (not a bool) in [low, high]; ValueError naming ``name`` otherwise."""
    if not is_int(value) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def check_number_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    """``value`` is a finite real number (not a bool) in [low, high] ((low, high] with ``low_open``)."""
    if not is_number(value) or not math.isfinite(value) or not (low < value if low_open else low <= value) \
            or not value <= high:
        raise ValueError(f"{name} must be a number in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")


class _Mismatch(Exception):
    pass


def _split_top(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets ("tuple[int, int] | None" at "|": two parts)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [*parts, text[start:].strip()]


def _describe(kind: str) -> str:
    """An annotation in words: "int", "a list of int", "a list of 2 float", "float or None"."""
    alternatives = _split_top(kind, "|")
    if len(alternatives) > 1:
        return " or ".join(_describe(a) for a in alternatives)
    if kind.startswith("tuple["):
        inner = _split_top(kind[6:-1], ",")
        if len(inner) == 2 and inner[1] == "...":
            return f"a list of {_describe(inner[0])}"
        return f"a list of {len(inner)} {_describe(inner[0])}" if len(set(inner)) == 1 else f"a list ({kind})"
    return kind


def _coerce(value: Any, kind: str) -> Any:
    """``value`` as annotation ``kind`` asks (ints become floats, sequences tuples); _Mismatch when it is not.
    Kinds other than int, float, bool, str, tuples of them and ``X | None`` pass unchecked (Any, classes, and
    unions such as ``int | str`` whose owner's own check names what they accept, e.g. "auto")."""
    alternatives = _split_top(kind, "|")
    if len(alternatives) > 1:
        if len(alternatives) != 2 or "None" not in alternatives:
            return value
        for alternative in alternatives:
            try:
                return _coerce(value, alternative)
            except _Mismatch:
                pass
        raise _Mismatch
    if kind.startswith("tuple["):
        inner = _split_top(kind[6:-1], ",")
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
            raise _Mismatch
        items = list(value)
        kinds = [inner[0]] * len(items) if len(inner) == 2 and inner[1] == "..." else inner
        if len(kinds) != len(items):
            raise _Mismatch
        return tuple(_coerce(v, k) for v, k in zip(items, kinds))
    if kind == "None":
        ok = value is None
    elif kind == "float":
        if is_int(value):
            return float(value)
        ok = isinstance(value, float)
    elif kind == "int":
        ok = is_int(value)
    elif kind in ("bool", "str"):
        ok = isinstance(value, {"bool": bool, "str": str}[kind])
    else:
        return value
    if not ok:
        raise _Mismatch
    return value


def coerce_fields(obj: Any, section: str) -> None:
    """Check a dataclass's field types against their annotations, in place: int, float, bool, str, None, tuples
    (``tuple[int, ...]``, ``tuple[float, float]``: any list or tuple, stored as a tuple) and ``X | None``; ints
    are accepted for floats (YAML writes 1 for 1.0) and stored as floats, bools never count as numbers. Other
    annotations (Any, nested settings) are left to the caller. Raises ValueError naming the key path
    (``section.field``, the field alone when ``section`` is empty), what it must be and what it got."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        try:
            coerced = _coerce(value, kind.replace("typing.", ""))
        except _Mismatch:
            raise ValueError(f"{section + '.' if section else ''}{f.name} must be {_describe(kind)}, "
                             f"got {value!r}") from None
        if coerced is not value:
            object.__setattr__(obj, f.name, coerced)
