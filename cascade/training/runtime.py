"""Process set-up for a training run: accelerate's process-wide state, torch.compile's toolchain, seeding /
RNG states for exact resume, and the run's one-line warnings (the precision a device computes natively is
`cascade.device`'s). No model or data code here."""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from cascade.device import resolve_mixed_precision
from cascade.training.trackers import make_trackers
from cascade.training.trainer_config import TrainerConfig, parse_report_to


def warn(message: str) -> None:
    """A one-line warning on stderr (no source line, unlike `warnings.warn`'s default format)."""
    print(f"warning: {message}", file=sys.stderr)


def check_compile_available(device: torch.device) -> None:
    """Raise ValueError (one line, naming the fix) when torch.compile's inductor backend cannot build kernels for
    ``device``: it needs a C++ compiler on CPU and Triton on CUDA."""
    import importlib.util
    import os
    import shutil

    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ValueError("trainer.compile=true needs Triton on CUDA (pip install triton); "
                             "or set trainer.compile=false")
    elif not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        raise ValueError("trainer.compile=true needs a C++ compiler (g++ or clang++) for torch.compile on CPU; "
                         "install one or set trainer.compile=false")


def make_accelerator(mixed_precision: str, **kwargs: Any) -> Accelerator:
    """An `Accelerator` with this run's precision, whatever an earlier run in the same process used.

    accelerate keeps one process-wide `AcceleratorState` and refuses a second precision ("AcceleratorState has
    already been initialized and cannot be changed"). One process may train a bf16 stage and then a
    full-precision one (a notebook, the demo, the test suite), so the precision part of that state is reset
    when it differs; the distributed part (`PartialState`: process group, rank, device) is kept.
    """
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, **kwargs)


def make_run_accelerator(cfg: TrainerConfig, run_dir: Path) -> tuple[Accelerator, str]:
    """(accelerator, resolved mixed precision: "no", "fp16" or "bf16") of a training run: the first accelerator
    device (CUDA, MPS or XPU) or the CPU, ``cfg.mixed_precision`` resolved for it (auto: bf16 where native),
    ``cfg.grad_accum`` micro-batches per step, the trackers of ``cfg.report_to`` writing into ``run_dir``
    (`cascade.training.trackers`; started by the trainer), TF32 matmuls on CUDA."""
    on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available()
                  or (hasattr(torch, "xpu") and torch.xpu.is_available()))
    probe = torch.device("cpu") if on_cpu else torch.device("cuda" if torch.cuda.is_available() else "mps")
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision, probe)
    log_with = make_trackers(parse_report_to(cfg.report_to), run_dir) or None
    # cpu=True makes accelerate use gloo across CPU processes (torchrun / accelerate launch).
    accelerator = make_accelerator(mixed_precision, cpu=on_cpu, log_with=log_with, project_dir=str(run_dir),
                                   gradient_accumulation_steps=cfg.grad_accum, step_scheduler_with_optimizer=False)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator, mixed_precision


def segment_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the data segment starting at ``step`` on ``rank`` (stable across runs and machines)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint32)[0])


@contextlib.contextmanager
def rng_kept() -> Iterator[None]:
    """Run the block and put the global RNG states (torch CPU and CUDA, numpy, python) back as they were: sample
    grids and quality proxies inside a training run leave its random stream, and so exact resume, untouched."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states as tensors/primitives (weights_only-loadable)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                       "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
