"""One helper per kind of input check, used at the edges that validate what they are given: the settings
objects in their constructors (`cascade.config`, `cascade.training.trainer_config`, ...) and the public entry
points of the library. The `check_*` helpers raise ValueError with one line naming the setting, what it must be,
and what it got; the `is_*` predicates let a caller raise its own one-line message."""

from __future__ import annotations

import dataclasses
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


def coerce_fields(obj: Any, section: str) -> None:
    """Check a frozen dataclass's scalar field types, accepting ints for floats (YAML writes 1 for 1.0)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if kind == "float" and is_int(value):
            object.__setattr__(obj, f.name, float(value))
        elif kind in ("int", "float", "bool", "str"):
            ok = is_int(value) if kind == "int" else isinstance(value, {"float": float, "bool": bool, "str": str}[kind])
            if not ok:
                raise ValueError(f"{section}.{f.name} must be {kind}, got {value!r}")
