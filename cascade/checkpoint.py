"""Self-describing, atomically written checkpoints.

Layout::

    <run_dir>/checkpoints/step-00001000/
        model.safetensors      raw weights
        ema.safetensors        EMA weights (what sampling uses)
        training_state.pt      optimizer, scheduler, RNG and data position (tensors/primitives only)
        config.json            {"format_version", "step", "stage": StageConfig.to_dict(), "train": {...},
                                "ema": the EMA weights' record (kind, warm-up weight, ready step)}
    <run_dir>/checkpoints/latest   names the newest complete step folder

A folder is written under a temporary name, every file and the folder are fsynced, then it is renamed
into place and ``latest`` is replaced the same way, so a kill at any moment leaves the previous
checkpoint intact. Loading never unpickles code: safetensors, JSON and ``torch.load(weights_only=True)``.

A checkpoint damaged after the fact (a truncated file after a full disk, a corrupt copy) raises
`CheckpointError` naming the file; `checkpoint_candidates` lists a run's checkpoints newest first so that a
resume can fall back to the newest readable one.

EMA weights not ready: `load_stage` (what sampling and evaluation load with) warns once per checkpoint, one line
on stderr, when the EMA weights it loads still carry more than 25 % of their average on the weights of the
learning-rate warm-up (the *warm-up weight*, `cascade.ema_profiles`; read from config.json's ``ema`` record, or
for a checkpoint without one computed from its trainer settings and step).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from cascade.atomic import fsync_path, write_atomic, write_guard
from cascade.ema_profiles import WARMUP_WEIGHT_LIMIT, classic_ema_record

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STEP_DIR_RE = re.compile(r"^step-(\d{8,})$")
WEIGHT_FILES = {"model": "model.safetensors", "ema": "ema.safetensors"}
TRAINING_STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, or of an unsupported format)."""


def _reason(err: BaseException) -> str:
    """The informative line of a loader's (possibly multi-line) error message."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


_PICKLED_GLOBAL = re.compile(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", re.IGNORECASE)


def _damaged(file: Path, err: BaseException) -> CheckpointError:
    if isinstance(err, pickle.UnpicklingError):  # torch's weights-only loader refused a pickled object
        found = _PICKLED_GLOBAL.search(str(err))
        what = f" (the global {found.group(1)})" if found else ""
        return CheckpointError(f"checkpoint file {file} holds pickled code{what} and is refused: loading it could "
                               "run arbitrary code; use a checkpoint this project wrote (another step folder) or "
                               "retrain")
    return CheckpointError(f"checkpoint file {file} is damaged or unreadable ({_reason(err)}); use an earlier "
                           "checkpoint (another step folder) or retrain")


def _missing(file: Path) -> CheckpointError:
    return CheckpointError(f"checkpoint file {file} is missing; use an earlier checkpoint (another step folder) "
                           "or retrain")


def _safetensors_device(device: str | torch.device) -> str:
    """safetensors names devices "cpu", "cuda", "cuda:1"; a torch device printed as "cpu:0" is refused."""
    dev = torch.device(device)
    return "cpu" if dev.type == "cpu" else str(dev)


def _contiguous_cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone to plain CPU tensors.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def _write_file(path: Path, content: bytes | memoryview) -> None:
    """Write ``content`` to ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def _torch_bytes(obj: Any) -> memoryview:
    """``obj`` as torch.save writes it (torch's own file writer reports a full disk without its errno)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Complete step folders under a checkpoints folder, oldest first."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR_RE.match(p.name))]
    return [p for _, p in sorted(found) if (p / "config.json").is_file()]


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    weights: dict[str, dict[str, torch.Tensor]],
    training_state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write one checkpoint atomically; keep the newest ``keep_last``; return its folder.

    ``weights`` maps "model"/"ema" to state dicts; ``config`` holds "stage" and "train" dicts. A failed write
    (a full disk: OSError ENOSPC naming the file) removes the partly written folder and leaves the earlier
    checkpoints and ``latest`` as they were.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    unknown = set(weights) - set(WEIGHT_FILES)
    if unknown:
        raise ValueError(f"unknown weight sets {sorted(unknown)}; expected some of {sorted(WEIGHT_FILES)}")
    if "stage" not in config:
        raise ValueError("config must contain the stage's full configuration under 'stage'")
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".{final.name}.tmp-{os.getpid()}"
    for leftover in ckpt_root.glob(".step-*.tmp-*"):  # from runs killed mid-write: free their space first
        shutil.rmtree(leftover, ignore_errors=True)
    record = {"format_version": FORMAT_VERSION, "step": int(step), **config}
    # serialized in memory, written through Python files: a full disk is an OSError with its errno (not a
    # serializer's own error), and a failed write removes the temporary folder (write_guard)
    with write_guard(final, tmp):
        tmp.mkdir()
        for which, state_dict in weights.items():
            _write_file(tmp / WEIGHT_FILES[which], safetensors_bytes(_contiguous_cpu(state_dict)))
        _write_file(tmp / TRAINING_STATE_FILE, _torch_bytes(training_state))
        _write_file(tmp / CONFIG_FILE, json.dumps(record, indent=2, sort_keys=True).encode())
        fsync_path(tmp)
    if final.exists():  # re-saving a step (e.g. after resume): move the old one aside first
        stale = ckpt_root / f".{final.name}.stale-{os.getpid()}"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_path(ckpt_root)
    write_atomic(ckpt_root / LATEST_FILE, final.name + "\n", tmp_suffix=f".tmp-{os.getpid()}")
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None when it has none."""
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = ckpt_root / LATEST_FILE
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):  # a damaged pointer: fall back to the folder listing
            name = ""
        named = ckpt_root / name
        if STEP_DIR_RE.match(name) and (named / "config.json").is_file():
            return named
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def checkpoint_candidates(run_dir: str | Path) -> list[Path]:
    """A run folder's step folders, the one ``latest`` names first, then the others newest first (what a resume
    tries in turn when the newest turns out damaged). A step folder without config.json is listed too: folders
    are renamed into place whole, so one that lacks it is damaged, and reading it says so."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    steps = [p for p in (root.iterdir() if root.is_dir() else ()) if p.is_dir() and STEP_DIR_RE.match(p.name)]
    found = sorted(steps, key=lambda p: int(STEP_DIR_RE.match(p.name).group(1)), reverse=True)
    try:
        named = root / (root / LATEST_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        named = None
    latest = named if named is not None and named in found else latest_checkpoint(run_dir)
    return ([latest] + [p for p in found if p != latest]) if latest is not None else found


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run folder, its checkpoints folder or one step folder; return the step folder."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if p.is_dir() and STEP_DIR_RE.match(p.name):  # a step folder is renamed into place whole: this one is damaged
        raise _missing(p / CONFIG_FILE)
    if p.name == CHECKPOINTS_DIR:
        p = p.parent
    found = latest_checkpoint(p)
    if found is None:
        if not p.exists():
            raise FileNotFoundError(f"checkpoint path {p} does not exist")
        raise FileNotFoundError(f"no checkpoint found in {p} (expected {CHECKPOINTS_DIR}/step-*/config.json)")
    return found


def load_config(path: str | Path) -> dict[str, Any]:
    """The config record of a checkpoint (stage, train, step, format_version)."""
    ckpt = resolve_checkpoint(path)
    file = ckpt / CONFIG_FILE
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _damaged(file, err) from None
    if not isinstance(record, dict):
        raise _damaged(file, ValueError(f"expected a JSON object, got {type(record).__name__}"))
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt}: checkpoint format {version} is not supported (expected {FORMAT_VERSION})")
    if "stage" not in record:
        raise _damaged(file, KeyError("no 'stage' entry"))
    return record


def load_weights(path: str | Path, which: str = "ema", device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The "model" or "ema" state dict of a checkpoint on ``device`` (CheckpointError if the file is damaged)."""
    if which not in WEIGHT_FILES:
        raise ValueError(f"which must be one of {sorted(WEIGHT_FILES)}, got {which!r}")
    ckpt = resolve_checkpoint(path)
    file = ckpt / WEIGHT_FILES[which]
    if not file.is_file():
        raise _missing(file)
    try:
        return load_file(str(file), device=_safetensors_device(device))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own (non-OSError) error type
        raise _damaged(file, err) from None


def load_training_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Optimizer, scheduler, RNG and data position (``torch.load(weights_only=True)``: no code unpickled)."""
    ckpt = resolve_checkpoint(path)
    file = ckpt / TRAINING_STATE_FILE
    if not file.is_file():
        raise _missing(file)
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, refused global, …: all mean "unreadable"
        raise _damaged(file, err) from None


def verify_checkpoint(path: str | Path) -> Path:
    """Read every file of a checkpoint (config, both weight sets, training state); CheckpointError naming the
    first missing or unreadable one. Returns the step folder."""
    ckpt = resolve_checkpoint(path)
    load_config(ckpt)
    for which in WEIGHT_FILES:
        load_weights(ckpt, which)
    load_training_state(ckpt)
    return ckpt


def load_stage_config(path: str | Path):
    """The `cascade.config.StageConfig` a checkpoint's config.json records; CheckpointError (one line naming the
    file) when the file is missing or unreadable or its settings are invalid (wrong type, out of range)."""
    from cascade.config import StageConfig

    record = load_config(path)
    try:
        return StageConfig.from_dict(record["stage"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint file {resolve_checkpoint(path) / CONFIG_FILE} holds an invalid stage "
                              f"setting: {err}; use an earlier checkpoint (another step folder) or retrain") from None


def check_weights_fit(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path,
                      which: str = "ema") -> None:
    """Check that a checkpoint's ``which`` weights fit ``model``, the network its config.json describes: the
    same tensor names with the same shapes. CheckpointError (one line naming both files, with the counts of
    tensors that differ in shape, are missing and are unexpected) otherwise."""
    ckpt = resolve_checkpoint(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    differ = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    if not (differ or missing or unexpected):
        return
    first = (f"{differ[0]} is {list(got[differ[0]])} in the file, {list(expected[differ[0]])} by the config"
             if differ else f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
    raise CheckpointError(
        f"{ckpt / WEIGHT_FILES[which]} does not match {ckpt / CONFIG_FILE}: {len(differ)} tensors differ in shape, "
        f"{len(missing)} missing, {len(unexpected)} unexpected (e.g. {first}); the weights and config.json of a "
        "step folder must come from the same run")


def load_stage(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu"):
    """Rebuild a stage from its checkpoint alone: (StageConfig, model in eval mode, diffusion).

    Raises CheckpointError (one line naming the file) for a missing, unreadable or mismatched file (weights
    whose tensors do not fit the network config.json describes) or settings that are invalid."""
    from cascade.nets.build import build_diffusion, build_model

    stage_cfg = load_stage_config(path)
    model = build_model(stage_cfg)
    state_dict = load_weights(path, weights, device="cpu")
    check_weights_fit(model, state_dict, path, weights)
    model.load_state_dict(state_dict)
    model.to(device).eval().requires_grad_(False)
    if weights == "ema":
        warn_if_ema_not_ready(path)
    return stage_cfg, model, build_diffusion(stage_cfg)


def ema_record(path: str | Path) -> dict[str, Any] | None:
    """The EMA weights' record of a checkpoint (kind, num_updates, warmup_steps, warmup_weight, ready_step, ...):
    config.json's ``ema`` entry, or for a checkpoint written without one, the classic EMA's record computed from
    its trainer settings (``ema_decay``, ``ema_warmup``, ``warmup_steps``) and step; None where neither is there."""
    record = load_config(path)
    ema = record.get("ema")
    if isinstance(ema, dict) and "warmup_weight" in ema:
        return ema
    trainer = (record.get("train") or {}).get("trainer")
    try:
        return classic_ema_record(float(trainer["ema_decay"]), float(trainer["ema_warmup"]), int(record["step"]),
                                  int(trainer["warmup_steps"]))
    except (KeyError, TypeError, ValueError, OverflowError):
        return None


_EMA_WARNED: set[Path] = set()


def ema_not_ready_message(ckpt: Path, ema: dict[str, Any]) -> str | None:
    """The one-line warning for EMA weights whose warm-up weight is above 0.25, else None."""
    weight = float(ema.get("warmup_weight", 0.0))
    if not weight > WARMUP_WEIGHT_LIMIT:
        return None
    what = f"post-hoc EMA σ_rel={ema['sigma_rel']:g}" if ema.get("kind") == "posthoc" else "EMA"
    return (f"{ckpt}: its {what} weights are not ready: {min(weight, 1.0):.0%} of their weight is on the first "
            f"{ema.get('warmup_steps')} steps (the learning-rate warm-up); ready at step {ema.get('ready_step')}; "
            "using the EMA weights anyway (train past that step; from Python, load_stage(..., weights='model') "
            "loads the raw weights)")


def warn_if_ema_not_ready(path: str | Path) -> None:
    """Print `ema_not_ready_message` as one line on stderr, once per checkpoint in a process."""
    ckpt = resolve_checkpoint(path).resolve()
    if ckpt in _EMA_WARNED:
        return
    ema = ema_record(ckpt)
    message = None if ema is None else ema_not_ready_message(ckpt, ema)
    if message is not None:
        _EMA_WARNED.add(ckpt)
        print(f"warning: {message}", file=sys.stderr)
