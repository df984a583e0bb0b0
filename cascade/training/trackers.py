"""The run's trackers (``trainer.report_to``), fed through accelerate: TensorBoard event files in
``<run_dir>/tensorboard`` and wandb runs in ``<run_dir>/wandb`` (offline unless WANDB_MODE says otherwise:
``wandb sync <run_dir>/wandb/offline-run-*`` uploads them). A resumed run writes into the same folders
(TensorBoard adds an event file beside the earlier ones and shows one curve; wandb starts one run per
invocation). The names and their validation are `cascade.training.trainer_config.parse_report_to`'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker
from PIL import Image

__all__ = ["TENSORBOARD_DIR", "WANDB_PROJECT", "log_image", "log_scalars", "make_trackers", "start_trackers",
           "tracker_folders"]

TENSORBOARD_DIR = "tensorboard"  # <run_dir>/tensorboard: `tensorboard --logdir <run_dir>`
WANDB_PROJECT = "cascade"


def make_trackers(names: tuple[str, ...], run_dir: Path) -> list[GeneralTracker]:
    """accelerate trackers for ``names`` (parsed ``trainer.report_to``), for `Accelerator(log_with=...)`: built
    here so their folders sit in ``run_dir``. Sets WANDB_MODE=offline when wandb is asked for and the variable
    is unset (a run never uploads unless told to)."""
    trackers: list[GeneralTracker] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(TENSORBOARD_DIR, str(run_dir)))
        elif name == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")
            trackers.append(WandBTracker(WANDB_PROJECT, dir=str(run_dir), name=Path(run_dir).name))
    return trackers


def tracker_folders(names: tuple[str, ...], run_dir: Path) -> str:
    """Where ``names`` write, in words (the start-up summary's row)."""
    where = {"tensorboard": f"tensorboard → {Path(run_dir) / TENSORBOARD_DIR}",
             "wandb": f"wandb ({os.environ.get('WANDB_MODE', 'offline')}) → {Path(run_dir) / 'wandb'}"}
    return "; ".join(where[n] for n in names) if names else "none (trainer.report_to=tensorboard or wandb adds one)"


def start_trackers(accelerator: Accelerator, config: dict[str, Any]) -> None:
    """Start the accelerator's trackers (main process); ``config`` (nested plain dicts) goes to wandb's run
    config as dotted keys (TensorBoard's hparams would add an event folder per invocation: left out)."""
    accelerator.init_trackers(WANDB_PROJECT)
    if any(t.name == "wandb" for t in accelerator.trackers):
        accelerator.get_tracker("wandb").store_init_configuration(_flatten(config))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
    return out


def log_scalars(accelerator: Accelerator, record: dict[str, Any]) -> None:
    """A metrics record's numbers (all but its step; None left out) to every tracker at its step."""
    if accelerator.trackers:
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                  and not isinstance(v, bool)}
        accelerator.log(values, step=int(record["step"]))


def log_image(accelerator: Accelerator, tag: str, path: Path, step: int) -> None:
    """The PNG at ``path`` (a sample grid) to every tracker at ``step``: TensorBoard's add_image, a wandb.Image."""
    if not accelerator.trackers:
        return
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, pixels, global_step=step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            tracker.log_images({tag: [pixels]}, step=step)
