"""The memory format a CPU training run uses under ``trainer.channels_last=auto``: measured, not guessed.

Whether channels-last (NHWC) convolutions beat the contiguous (NCHW) ones on a CPU depends on the CPU, the
precision and the layer shapes: on a 2-core AMD EPYC (AVX2, fp32) channels-last trained base32 22% faster
(batch 32) but sr128 / sr256 10–40% slower (measured: docs/results/2026-12-01.md, 2026-11-29.md).
`probe_channels_last` times the run's own training computation (loss forward + backward of a copy of the
model, at the run's batch size and precision) in both layouts and picks the faster, as cuDNN's benchmark
mode picks a kernel.
No model is changed and the global RNG state is restored, so a run's numbers do not depend on the probe
having run.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cascade.config import StageConfig
from cascade.diffusion.gaussian import GaussianDiffusion
from cascade.training.losses import example_batch, make_stage_loss
from cascade.training.runtime import get_rng_state, set_rng_state
from cascade.training.timestep_sampler import stage_timestep_sampler
from cascade.training.trainer_config import TrainerConfig

# channels-last must be at least this much faster to be chosen: below it, timing noise decides.
MIN_GAIN = 0.05
# trainer.channels_last=auto measures the layouts on CPU only for runs with at least this many steps to go (or a
# time budget): the probe costs about 8 training steps' forward + backward.
PROBE_MIN_STEPS = 200


@dataclass(frozen=True)
class LayoutProbe:
    """Median seconds of one training forward + backward per layout, and the choice made from them."""

    contiguous_s: float
    channels_last_s: float
    channels_last: bool

    def describe(self) -> str:
        chosen = "channels_last" if self.channels_last else "contiguous"
        return (f"channels_last=auto: a training step's forward+backward took {self.contiguous_s * 1e3:.0f} ms "
                f"contiguous, {self.channels_last_s * 1e3:.0f} ms channels-last; using {chosen}")


def _time_layout(model: torch.nn.Module, loss_fn: Callable, batch: dict[str, torch.Tensor], *, channels_last: bool,
                 trials: int, autocast: Callable[[], contextlib.AbstractContextManager]) -> float:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    probe = copy.deepcopy(model).to(memory_format=fmt).train()
    data = {k: (v.contiguous(memory_format=fmt) if v.ndim == 4 else v) for k, v in batch.items()}
    times = []
    for i in range(trials + 1):  # the first pass warms the kernels' caches and is not counted
        start = time.perf_counter()
        with autocast():
            loss = loss_fn(probe, data)["loss"]
        loss.backward()
        probe.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe_channels_last(model: torch.nn.Module, loss_fn: Callable, batch: dict[str, torch.Tensor], *, trials: int = 3,
                        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                        ) -> LayoutProbe:
    """Time ``loss_fn(model, batch)["loss"]`` forward + backward in both memory formats; choose channels-last when it
    is at least `MIN_GAIN` (5%) faster.

    ``model``: the network as it will train (left untouched: copies are timed). ``loss_fn``: the stage's loss
    callable (`cascade.training.losses.make_stage_loss`). ``batch``: a training batch on the model's device (B×3×H×W images
    in [-1, 1], labels, and for SR stages the low-resolution input). ``autocast``: the run's autocast context
    factory (bf16 changes which layout wins). ``trials`` ≥ 1 timed passes per layout after one warm-up; the
    median counts. The global RNG states (torch, numpy, python) are restored afterwards.
    Raises ValueError for ``trials`` < 1.
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    rng = get_rng_state()
    try:
        contiguous_s = _time_layout(model, loss_fn, batch, channels_last=False, trials=trials, autocast=autocast)
        channels_last_s = _time_layout(model, loss_fn, batch, channels_last=True, trials=trials, autocast=autocast)
    finally:
        set_rng_state(rng)
    return LayoutProbe(contiguous_s, channels_last_s, channels_last_s < (1.0 - MIN_GAIN) * contiguous_s)


def choose_channels_last(model: torch.nn.Module, stage: StageConfig, diffusion: GaussianDiffusion, cfg: TrainerConfig,
                         state: dict | None, *, world_size: int, device: torch.device,
                         autocast: Callable[[], contextlib.AbstractContextManager],
                         say: bool, loss_fn: Callable | None = None) -> tuple[bool, LayoutProbe | None]:
    """(channels_last, the probe or None) of ``trainer.channels_last=auto`` on CPU: the layout a resumed run used
    (``state``, its checkpoint's training state), else the faster one measured on this machine (`probe_channels_last`
    on ``loss_fn``, by default the stage's loss, at ``cfg.batch_size``). Runs with fewer than `PROBE_MIN_STEPS` steps to go and no time budget,
    and multi-process runs (every rank must agree), keep the contiguous layout. ``say``: print the probe's result
    on stderr."""
    if state is not None and "channels_last" in state:
        return bool(state["channels_last"]), None
    remaining = cfg.max_steps - (int(state["step"]) if state is not None else 0)
    if world_size > 1 or (remaining < PROBE_MIN_STEPS and not cfg.max_seconds):
        return False, None
    if loss_fn is None:
        sampler = stage_timestep_sampler(stage.diffusion, diffusion)
        loss_fn = make_stage_loss(stage, diffusion, sampler, cfg.p_uncond)
    probe = probe_channels_last(model, loss_fn, example_batch(stage, cfg.batch_size, device=device), autocast=autocast)
    if say:
        print(probe.describe(), file=sys.stderr)
    return probe.channels_last, probe
