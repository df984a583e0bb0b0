"""A chain of stages rebuilt from checkpoints: loading (configs first, weights after the chain is checked) and
the rule that each SR stage takes the previous stage's output size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cascade.checkpoint import load_config, load_stage, load_stage_config, resolve_checkpoint
from cascade.config import StageConfig, StageKind
from cascade.pipeline.plan import CascadeConfigError


@dataclass
class LoadedStage:
    """One stage rebuilt from its checkpoint."""

    name: str
    config: StageConfig
    model: torch.nn.Module
    diffusion: Any  # cascade.GaussianDiffusion on the training timesteps
    checkpoint: Path
    step: int
    class_names: list[str] | None = None


def _class_names(record: dict[str, Any]) -> list[str] | None:
    """Class names of the dataset a stage was trained on, as the trainer records them."""
    names = record.get("train", {}).get("dataset", {}).get("class_names")
    return [str(n) for n in names] if names else None


def check_chain(names: Sequence[str], configs: Sequence[Any]) -> None:
    """Each SR stage must take the previous stage's output size; the chain starts with a base stage."""
    if not names:
        raise CascadeConfigError("no stages given; name at least the base stage, e.g. base32")
    for i, (name, cfg) in enumerate(zip(names, configs)):
        if cfg.name != name:
            raise CascadeConfigError(
                f"stage {name}: its checkpoint holds stage {cfg.name!r}; give {name} a {name} checkpoint"
            )
        if i == 0 and cfg.kind is not StageKind.base:
            raise CascadeConfigError(
                f"stage {name}: the chain must start with a base stage, but {name} is a {cfg.kind.value} stage; "
                "start with base32"
            )
        if i > 0 and cfg.kind is not StageKind.sr:
            raise CascadeConfigError(
                f"stage {name}: only super-resolution stages can follow the base stage, but {name} is a "
                f"{cfg.kind.value} stage; remove it from the chain"
            )
        if i > 0 and cfg.low_resolution != configs[i - 1].resolution:
            prev = names[i - 1]
            raise CascadeConfigError(
                f"stage {name}: takes {cfg.low_resolution}x{cfg.low_resolution} inputs but {prev} makes "
                f"{configs[i - 1].resolution}x{configs[i - 1].resolution} images; put a stage of resolution "
                f"{cfg.low_resolution} before {name} or drop {name}"
            )


def read_checkpoint(name: str, path: str | Path, advice: str | None = None) -> tuple[Path, dict[str, Any], Any]:
    """(step folder, config record, StageConfig) of a checkpoint, without loading weights. CascadeConfigError (one
    line starting ``stage <name>:``) when it is missing or damaged; ``advice`` replaces the closing advice for a
    missing one (default: train it, pass a checkpoint, or leave the stage out)."""
    try:
        ckpt = resolve_checkpoint(path)
        record = load_config(ckpt)
        return ckpt, record, load_stage_config(ckpt)
    except (FileNotFoundError, ValueError, KeyError) as err:
        message = str(err)
        if "checkpoint" in message and ("retrain" in message or "earlier" in message):
            advice = ""  # damaged files: their own advice
        elif advice is None:
            advice = f"train it, pass a checkpoint for {name}, or leave {name} out (--stages)"
        raise CascadeConfigError(f"stage {name}: {message}{'; ' + advice if advice else ''}") from None


def load_loaded_stage(name: str, ckpt: Path, record: dict[str, Any], cfg: Any, device: torch.device,
                      weights: str = "ema") -> LoadedStage:
    _, model, diffusion = load_stage(ckpt, weights=weights, device=device)
    return LoadedStage(name, cfg, model, diffusion, ckpt, int(record["step"]), _class_names(record))


def check_classifier(path: str | Path, cfg: StageConfig) -> None:
    """Raise CascadeConfigError (one line) unless the checkpoint at ``path`` holds a classifier stage."""
    if cfg.kind is not StageKind.classifier:
        raise CascadeConfigError(
            f"classifier: {path} holds a {cfg.kind.value} stage ({cfg.name}); pass a classifier checkpoint"
        )


def check_guide(stage: StageConfig, path: str | Path, guide: StageConfig) -> None:
    """Raise CascadeConfigError (one line naming ``stage`` and the fix) unless ``guide``, the config of the
    checkpoint at ``path``, can autoguide ``stage``: the same stage (name and kind), resolution and low
    resolution, number of classes, prediction type, schedule and number of timesteps, and neither a classifier
    nor a distilled student. Its network (size, attention, variance output) may differ."""
    name = stage.name
    fix = f"pass a checkpoint of {name} (an earlier one of its run, or a smaller run of {name})"
    if guide.kind is StageKind.classifier:
        raise CascadeConfigError(f"stage {name}: guide {path} holds a classifier ({guide.name}); {fix}")
    if (guide.name, guide.kind) != (stage.name, stage.kind):
        raise CascadeConfigError(f"stage {name}: guide {path} holds stage {guide.name} (a {guide.kind.value} "
                                 f"stage), not {name}; {fix}")
    if guide.distill.method != "none":
        raise CascadeConfigError(f"stage {name}: guide {path} is a {guide.distill.method}-distilled student; guide "
                                 f"with an undistilled checkpoint of {name}")
    mine, theirs = stage.diffusion, guide.diffusion
    for what, ours, its in (
        ("resolution", stage.resolution, guide.resolution),
        ("low_resolution", stage.low_resolution, guide.low_resolution),
        ("num_classes", stage.num_classes, guide.num_classes),
        ("prediction", mine.prediction, theirs.prediction),
        ("schedule", mine.schedule, theirs.schedule),
        ("num_timesteps", mine.num_timesteps, theirs.num_timesteps),
    ):
        if ours != its:
            raise CascadeConfigError(f"stage {name}: guide {path} has {what} {its} but {name} has {ours}; pass a "
                                     f"guide of {name} with the same {what}")
