"""Parsing of command-line values shared by the tools: `STAGE=value` lists, class lists, `--ckpt` pairs.

Every malformed value raises `CascadeConfigError` with a one-line message naming the option and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TypeVar

from cascade.pipeline import CascadeConfigError

T = TypeVar("T")

# A comma starts a new item only where a `STAGE=` follows, so a value may itself hold commas
# (`--steps base32=10,5,sr64=ddim4` → base32: "10,5", sr64: "ddim4").
_ITEM_SPLIT = re.compile(r",(?=\s*[A-Za-z_][\w-]*\s*=)")
_STAGE_NAME = re.compile(r"^[A-Za-z_][\w-]*$")


def parse_stage_values(text: str, cast: Callable[[str], T], option: str) -> T | dict[str, T]:
    """Parse `VALUE` (one value for every stage) or `STAGE=VALUE[,STAGE=VALUE...]` (per stage)."""
    text = text.strip()
    example = f"{option} VALUE or {option} base32=VALUE,sr64=VALUE"
    if not text:
        raise CascadeConfigError(f"{option}: empty value; expected {example}")
    if "=" not in text:
        return _cast(cast, text, option, example)
    values: dict[str, T] = {}
    for item in _ITEM_SPLIT.split(text):
        stage, sep, raw = item.partition("=")
        stage, raw = stage.strip(), raw.strip()
        if not sep or not _STAGE_NAME.match(stage) or not raw:
            raise CascadeConfigError(f"{option}: malformed item {item!r} in {text!r}; expected {example}")
        if stage in values:
            raise CascadeConfigError(f"{option}: stage {stage} is given twice in {text!r}; give it once")
        values[stage] = _cast(cast, raw, option, example)
    return values


def _cast(cast: Callable[[str], T], raw: str, option: str, example: str) -> T:
    try:
        return cast(raw)
    except ValueError as err:
        raise CascadeConfigError(f"{option}: bad value {raw!r} ({err}); expected {example}") from None


def steps_value(raw: str) -> int | str:
    """A respacing value: an integer step count, or a `space_timesteps` string ("ddim25", "10,5")."""
    return int(raw) if re.fullmatch(r"[+-]?\d+", raw) else raw


def parse_classes(text: str) -> list[int]:
    """`1,7` → [1, 7]."""
    try:
        classes = [int(c) for c in text.split(",")]
    except ValueError:
        raise CascadeConfigError(
            f"--classes: malformed {text!r}; expected comma-separated class indices, e.g. --classes 1,7"
        ) from None
    return classes


def parse_stage_list(text: str, valid: Iterable[str], option: str = "--stages") -> list[str]:
    """`base32,sr64` → ["base32", "sr64"]; unknown or repeated names are errors."""
    valid = list(valid)
    names = [n.strip() for n in text.split(",")]
    for name in names:
        if name not in valid:
            raise CascadeConfigError(f"{option}: unknown stage {name!r}; valid stages: {', '.join(valid)}")
    if len(set(names)) != len(names):
        raise CascadeConfigError(f"{option}: a stage is named twice in {text!r}; name each once")
    return names


def parse_ckpt_pairs(items: Iterable[str], option: str = "--ckpt") -> dict[str, str]:
    """Repeated `STAGE=PATH` → {stage: path}."""
    pairs: dict[str, str] = {}
    for item in items:
        stage, sep, path = item.partition("=")
        stage, path = stage.strip(), path.strip()
        if not sep or not _STAGE_NAME.match(stage) or not path:
            raise CascadeConfigError(f"{option}: malformed {item!r}; expected {option} STAGE=PATH, e.g. "
                                     f"{option} sr64=runs/sr64")
        if stage in pairs:
            raise CascadeConfigError(f"{option}: stage {stage} is given twice; give one checkpoint per stage")
        pairs[stage] = path
    return pairs
