"""One optimizer step of the stage trainer (`TrainStep`) and the on-device sums of a logging window it fills
(`new_window`): the code `cascade.training.trainer.StageTrainer` runs and `tools/bench.py` times.

Non-finite losses skip the optimizer step without a host–device synchronisation (the fused AdamW's
`found_inf`, as GradScaler uses it). A skipped step advances neither the EMA warm-up nor anything logged as
trained; the `lr` logged at step n is the rate step n used.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch.profiler import record_function

from cascade.training.ema import EMA, EMAGroup, PowerEMA
from cascade.training.optimizer import make_optimizer
from cascade.training.timestep_sampler import TimestepSampler, UniformSampler
from cascade.training.trainer_config import TrainerConfig

__all__ = ["SCOPES", "TrainStep", "new_window", "standalone_train_step"]

# The profiler labels of a step's parts (`torch.profiler.record_function`) → the kind `tools/bench.py --profile`
# reports them as: the optimizer's (gradient clipping, AdamW, zeroing the gradients, the LR schedule), the EMA
# update's, and fetching a batch (labelled by the caller).
SCOPES = {"cascade::optimizer": "optimizer", "cascade::ema": "EMA", "cascade::data": "data"}


def new_window(device: torch.device) -> dict[str, torch.Tensor]:
    """Zeroed on-device sums of one logging window (filled by `TrainStep`, read at log steps)."""
    return {"loss": torch.zeros((), device=device), "grad_norm": torch.zeros((), device=device),
            "q_sum": torch.zeros(4, device=device), "q_count": torch.zeros(4, device=device),
            "correct": torch.zeros((), device=device), "seen": torch.zeros((), device=device),
            "max_in_row": torch.zeros((), dtype=torch.long, device=device)}


class TrainStep:
    """One optimizer step of the stage trainer: the code `StageTrainer` runs and `tools/bench.py` times.

    ``step(micro_batches, window)``: for each micro-batch (``grad_accum`` of them, on the device) the stage
    loss under the accelerator's autocast and its backward; gradient clipping; AdamW, skipped on device for
    a non-finite loss or gradient norm (fused AdamW's ``found_inf``: no host synchronisation); the LR
    schedule; the EMA update (skipped likewise). The window's on-device sums (`new_window`) and the
    non-finite counters ``nan_total`` / ``nan_in_row`` (0-dim long tensors) are updated in place.
    ``compile=True`` runs the model's forward through ``torch.compile`` (the weights stay shared).
    """

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer, scheduler, ema: EMA,
                 loss_fn, timestep_sampler: TimestepSampler, *, grad_clip: float, fused: bool, mixed_precision: str,
                 nan_total: torch.Tensor, nan_in_row: torch.Tensor, compile: bool = False):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.ema, self.loss_fn, self.timestep_sampler = ema, loss_fn, timestep_sampler
        self.grad_clip, self.fused, self.mixed_precision = grad_clip, fused, mixed_precision
        self.nan_total, self.nan_in_row = nan_total, nan_in_row
        self.runner = torch.compile(model) if compile else model
        self.num_timesteps = timestep_sampler.num_timesteps
        self.last_lr = float("nan")  # the rate the latest step used (logged with it)

    def __call__(self, micro_batches: list[dict[str, torch.Tensor]], window: dict[str, torch.Tensor]) -> None:
        acc = self.accelerator
        n = len(micro_batches)
        step_loss = torch.zeros((), device=self.nan_total.device)
        for batch in micro_batches:
            with acc.accumulate(self.model):
                out = self.loss_fn(self.runner, batch)
                acc.backward(out["loss"])
            per_sample, t = out["per_sample"].detach().float(), out["t"]
            if not isinstance(self.timestep_sampler, UniformSampler):  # importance sampling needs every rank's losses
                self.timestep_sampler.update_with_all_losses(acc.gather(t), acc.gather(per_sample))
            step_loss += out["loss"].detach().float() / n
            quarter = torch.clamp(t * 4 // self.num_timesteps, max=3)
            finite = torch.isfinite(per_sample)
            window["q_sum"].index_add_(0, quarter, torch.where(finite, per_sample, 0.0))
            window["q_count"].index_add_(0, quarter, finite.float())
            if "correct" in out:
                window["correct"] += out["correct"]
                window["seen"] += len(t)
        with record_function("cascade::optimizer"):
            max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm).detach().float()
            loss_bad = ~torch.isfinite(step_loss)
            if self.mixed_precision == "fp16":
                bad = loss_bad  # the GradScaler skips steps with non-finite gradients itself
            else:
                bad = loss_bad | ~torch.isfinite(grad_norm)
                if self.fused:
                    self.optimizer.optimizer.found_inf = bad.float()  # fused AdamW skips the update on device
            self.last_lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
            if self.fused or self.mixed_precision == "fp16" or not bool(bad):
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        with record_function("cascade::ema"):
            self.ema.update(acc.unwrap_model(self.model), apply=~bad)
        bad_long = bad.long()
        self.nan_total += bad_long
        self.nan_in_row.add_(bad_long).mul_(bad_long)  # consecutive non-finite steps: +1, or back to 0
        window["max_in_row"] = torch.maximum(window["max_in_row"], self.nan_in_row)
        window["loss"] += torch.where(bad, 0.0, step_loss)
        window["grad_norm"] += torch.where(bad, 0.0, grad_norm)


def standalone_train_step(accelerator: Accelerator, model: torch.nn.Module, loss_fn, timestep_sampler: TimestepSampler,
                          cfg: TrainerConfig, device: torch.device, *, mixed_precision: str,
                          compile: bool | None = None) -> tuple[TrainStep, torch.nn.Module]:
    """(step, prepared model): the trainer's step outside a run, for timing it (`tools/bench.py`,
    `tools/estimate.py`): the EMA of ``cfg.ema_decay`` and the power-function EMAs of ``cfg.ema_sigma_rels``
    (updated every step, as in a run), AdamW and its LR schedule from ``cfg``, ``model`` prepared by
    ``accelerator``, fresh non-finite counters. ``compile`` (None: ``cfg.compile``) as in `TrainStep`."""
    ema = EMAGroup(EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup),
                   PowerEMA(model, cfg.ema_sigma_rels) if cfg.ema_sigma_rels else None)
    optimizer, scheduler, fused = make_optimizer(model, cfg, device)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    step = TrainStep(accelerator, prepared, optimizer, scheduler, ema, loss_fn, timestep_sampler,
                     grad_clip=cfg.grad_clip, fused=fused, mixed_precision=mixed_precision,
                     nan_total=torch.zeros((), dtype=torch.long, device=device),
                     nan_in_row=torch.zeros((), dtype=torch.long, device=device),
                     compile=cfg.compile if compile is None else compile)
    return step, prepared
