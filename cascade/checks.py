"""One helper per kind of input check, used by the settings objects that validate themselves in their
constructors (`cascade.config`, `cascade.training.trainer_config`). Each raises ValueError with one line
naming the setting, what it must be, and what it got."""

from __future__ import annotations

import dataclasses
from typing import Any


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def is_auto_or_bool(value: Any) -> bool:
    """Whether ``value`` is "auto", True or False (not 1 or 0, which compare equal to True and False but are
    not booleans)."""
    return value == "auto" or isinstance(value, bool)


def check_num_workers(num_workers: Any) -> None:
    """``data.num_workers`` is ``"auto"`` or an integer >= 0."""
    if num_workers != "auto" and (isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0):
        raise ValueError(f"data.num_workers must be auto or an integer >= 0, got {num_workers!r}")


def coerce_fields(obj: Any, section: str) -> None:
    """Check a frozen dataclass's scalar field types, accepting ints for floats (YAML writes 1 for 1.0)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(obj, f.name, float(value))
        elif kind in ("int", "float", "bool", "str"):
            ok = {"int": int, "float": float, "bool": bool, "str": str}[kind]
            if not isinstance(value, ok) or (kind == "int" and isinstance(value, bool)):
                raise ValueError(f"{section}.{f.name} must be {kind}, got {value!r}")
