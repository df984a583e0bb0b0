"""The stage trainer: one stage (base, super-resolution or classifier) from shards to checkpoints.

accelerate handles devices, mixed precision, gradient accumulation and distribution (one CPU, one GPU,
`accelerate launch` / `torchrun` over many; gloo on CPU). Per step: null-class dropout (p_uncond) for
classifier-free guidance, conditioning augmentation of the low-resolution input for SR stages, the
stage's diffusion loss (or cross-entropy on noised images for the classifier), AdamW with warmup and
clipping, then an EMA update.

Exact resume: every checkpoint step S starts a new data *segment*. All randomness of the segment (the
loader's shuffle, noise, timesteps, dropout, augmentation) is seeded from (seed, S, rank), so a run
resumed from the checkpoint at S replays exactly what the uninterrupted run did after S, without
replaying the data stream. The checkpoint also stores each rank's RNG states at that point. (The
final checkpoint starts a segment too, so extending a finished run continues from there, not from where
an uninterrupted longer run would be.)

Non-finite losses skip the optimizer step without a host–device synchronisation (the fused AdamW's
`found_inf`, as GradScaler uses it); the hot loop synchronises only at log, checkpoint and sample
steps, where too many non-finite steps in a row stop the run with `NonFiniteLossError`.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object, is_tensorboard_available
from tqdm.auto import tqdm

from cascade import checkpoint
from cascade.augment import augment_low_res, condition_low_res
from cascade.build import build_diffusion, build_model
from cascade.config import AugConfig, StageConfig, StageKind
from cascade.data import make_stage_loader, read_dataset_info
from cascade.device import native_bf16
from cascade.diffusion import GaussianDiffusion
from cascade.ema import EMA
from cascade.imageops import image_grid, upsample
from cascade.samplers import sample_ddpm
from cascade.timestep_sampler import TimestepSampler, UniformSampler, make_timestep_sampler
from cascade.trainer_config import RunConfig, TrainerConfig

METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "xpu")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN or infinite loss."""


# ----------------------------------------------------------------------------------------------- setup

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


def resolve_mixed_precision(mode: str, device: torch.device) -> str:
    """"auto" → "bf16" where the device computes bf16 natively (`native_bf16`), else "no"; other modes pass
    through."""
    if mode != "auto":
        return mode
    return "bf16" if native_bf16(device) else "no"


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


def segment_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the data segment starting at ``step`` on ``rank`` (stable across runs and machines)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint32)[0])


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


def _check_classes(info: dict[str, Any], stage, root: str) -> None:
    if len(info["class_names"]) != stage.num_classes:
        raise ValueError(f"stage {stage.name} has {stage.num_classes} classes but the shards in {root} have "
                         f"{len(info['class_names'])}")


def _stage_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _stage_differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} → {vb!r}")
    return out


# ----------------------------------------------------------------------------------------------- loss

def drop_labels(y: torch.Tensor, p_uncond: float, null_class: int) -> torch.Tensor:
    """Replace each label by the null class with probability p_uncond (classifier-free guidance)."""
    if p_uncond == 0:
        return y
    drop = torch.rand(y.shape, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null_class), y)


def sample_timesteps(sampler: TimestepSampler, batch: int, device: torch.device):
    """(t, importance weights or None); uniform t is drawn on the device (no host round trip)."""
    if isinstance(sampler, UniformSampler):
        return torch.randint(0, sampler.num_timesteps, (batch,), device=device), None
    return sampler.sample(batch, device)


class DiffusionLoss:
    """Training loss of a base stage: null-class dropout with probability p_uncond (Ho & Salimans 2022 §3.2),
    then the diffusion's per-sample loss at t from the timestep sampler (L_simple, slides eq. 14 / Ho et al.
    2020 eq. 14; or the hybrid L_simple + λ·L_vlb, Nichol & Dhariwal 2021 eq. 16), importance-weighted when
    the sampler is not uniform. Returns {"loss": scalar, "per_sample": B, "t": B}."""

    def __init__(self, diffusion: GaussianDiffusion, sampler: TimestepSampler, *, num_classes: int, p_uncond: float):
        self.diffusion, self.sampler = diffusion, sampler
        self.num_classes, self.p_uncond = num_classes, p_uncond

    def conditioning(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"y": drop_labels(batch["y"], self.p_uncond, self.num_classes)}

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x0 = batch["x"]
        t, weights = sample_timesteps(self.sampler, x0.shape[0], x0.device)
        per_sample = self.diffusion.training_losses(model, x0, t, noise=torch.randn_like(x0),
                                                    model_kwargs=self.conditioning(batch))["loss"]
        loss = (per_sample * weights).mean() if weights is not None else per_sample.mean()
        return {"loss": loss, "per_sample": per_sample, "t": t}


class SRDiffusionLoss(DiffusionLoss):
    """Training loss of a super-resolution stage: `DiffusionLoss` with the low-resolution input conditioned by
    Gaussian (and, per the stage, blur) augmentation at a random level s (Ho et al. 2021 "Cascaded Diffusion
    Models" §3.2), which the model also receives."""

    def __init__(self, diffusion: GaussianDiffusion, sampler: TimestepSampler, *, num_classes: int, p_uncond: float,
                 aug: AugConfig):
        super().__init__(diffusion, sampler, num_classes=num_classes, p_uncond=p_uncond)
        self.aug = aug

    def conditioning(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x_low, aug_level = augment_low_res(batch["x_low"], self.aug)
        return {**super().conditioning(batch), "x_low": x_low, "aug_level": aug_level}


class ClassifierLoss:
    """Training loss of a noise-aware classifier (Dhariwal & Nichol 2021 §4.1): cross-entropy of the label on
    x_t ~ q(x_t | x_0) at a random t. Returns {"loss", "per_sample": B, "t": B, "correct": count}."""

    def __init__(self, diffusion: GaussianDiffusion, sampler: TimestepSampler):
        self.diffusion, self.sampler = diffusion, sampler

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x0, y = batch["x"], batch["y"]
        t, _ = sample_timesteps(self.sampler, x0.shape[0], x0.device)
        x_t = self.diffusion.q_sample(x0, t, noise=torch.randn_like(x0))
        logits = model(x_t, self.diffusion.model_timesteps(t))
        per_sample = F.cross_entropy(logits.float(), y, reduction="none")
        return {"loss": per_sample.mean(), "per_sample": per_sample, "t": t,
                "correct": (logits.argmax(dim=1) == y).sum()}


def make_stage_loss(stage: StageConfig, diffusion: GaussianDiffusion, sampler: TimestepSampler,
                    p_uncond: float) -> DiffusionLoss | ClassifierLoss:
    """The loss callable ``loss(model, batch)`` of the stage's kind, chosen once per run."""
    if stage.kind is StageKind.classifier:
        return ClassifierLoss(diffusion, sampler)
    if stage.kind is StageKind.sr:
        return SRDiffusionLoss(diffusion, sampler, num_classes=stage.num_classes, p_uncond=p_uncond, aug=stage.aug)
    return DiffusionLoss(diffusion, sampler, num_classes=stage.num_classes, p_uncond=p_uncond)


# ----------------------------------------------------------------------------------------------- one step

def make_optimizer(model: torch.nn.Module, cfg: TrainerConfig, device: torch.device):
    """(AdamW, LR scheduler, fused) of a run: AdamW (fused on CPU/CUDA/XPU) with linear warmup to lr over
    ``cfg.warmup_steps``, then constant."""
    fused = device.type in FUSED_ADAMW_DEVICES
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay, fused=fused)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return optimizer, scheduler, fused


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
                 loss_fn, sampler: TimestepSampler, *, grad_clip: float, fused: bool, mixed_precision: str,
                 nan_total: torch.Tensor, nan_in_row: torch.Tensor, compile: bool = False):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.ema, self.loss_fn, self.sampler = ema, loss_fn, sampler
        self.grad_clip, self.fused, self.mixed_precision = grad_clip, fused, mixed_precision
        self.nan_total, self.nan_in_row = nan_total, nan_in_row
        self.runner = torch.compile(model) if compile else model
        self.num_timesteps = sampler.num_timesteps

    def __call__(self, micro_batches: list[dict[str, torch.Tensor]], window: dict[str, torch.Tensor]) -> None:
        acc = self.accelerator
        n = len(micro_batches)
        step_loss = torch.zeros((), device=self.nan_total.device)
        for batch in micro_batches:
            with acc.accumulate(self.model):
                out = self.loss_fn(self.runner, batch)
                acc.backward(out["loss"])
            per_sample, t = out["per_sample"].detach().float(), out["t"]
            if not isinstance(self.sampler, UniformSampler):  # importance sampling needs every rank's losses
                self.sampler.update_with_all_losses(acc.gather(t), acc.gather(per_sample))
            step_loss += out["loss"].detach().float() / n
            quarter = torch.clamp(t * 4 // self.num_timesteps, max=3)
            finite = torch.isfinite(per_sample)
            window["q_sum"].index_add_(0, quarter, torch.where(finite, per_sample, 0.0))
            window["q_count"].index_add_(0, quarter, finite.float())
            if "correct" in out:
                window["correct"] += out["correct"]
                window["seen"] += len(t)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm).detach().float()
        loss_bad = ~torch.isfinite(step_loss)
        if self.mixed_precision == "fp16":
            bad = loss_bad  # the GradScaler skips steps with non-finite gradients itself
        else:
            bad = loss_bad | ~torch.isfinite(grad_norm)
            if self.fused:
                self.optimizer.optimizer.found_inf = bad.float()  # fused AdamW skips the update on device
        if self.fused or self.mixed_precision == "fp16" or not bool(bad):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.ema.update(acc.unwrap_model(self.model), apply=~bad)
        bad_long = bad.long()
        self.nan_total += bad_long
        self.nan_in_row.add_(bad_long).mul_(bad_long)  # consecutive non-finite steps: +1, or back to 0
        window["max_in_row"] = torch.maximum(window["max_in_row"], self.nan_in_row)
        window["loss"] += torch.where(bad, 0.0, step_loss)
        window["grad_norm"] += torch.where(bad, 0.0, grad_norm)


# ----------------------------------------------------------------------------------------------- outputs

class MetricsLog:
    """JSONL metrics in the run folder (main process); on resume, records after the resumed step go."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.is_file():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------- trainer

class StageTrainer:
    """Trains one stage per a `RunConfig`; `run()` returns the final checkpoint folder.

    Construction checks the shards and the resume point and builds everything (configuration errors
    surface here as ValueError / FileNotFoundError); `run()` trains.
    """

    def __init__(self, stage, run: RunConfig, *, extra_config: dict[str, Any] | None = None):
        self.stage, self.run_cfg, self.cfg = stage, run, run.trainer
        self.run_dir = Path(run.run_dir)
        self.extra_config = dict(extra_config or {})
        self.dataset_info = read_dataset_info(run.data.root)
        _check_classes(self.dataset_info, stage, run.data.root)

        on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available()
                      or (hasattr(torch, "xpu") and torch.xpu.is_available()))
        probe = torch.device("cpu") if on_cpu else torch.device("cuda" if torch.cuda.is_available() else "mps")
        self.mixed_precision = resolve_mixed_precision(self.cfg.mixed_precision, probe)
        log_with = "tensorboard" if is_tensorboard_available() else None
        # cpu=True makes accelerate use gloo across CPU processes (torchrun / accelerate launch).
        self.accelerator = make_accelerator(self.mixed_precision, cpu=on_cpu, log_with=log_with,
                                       project_dir=str(self.run_dir), gradient_accumulation_steps=self.cfg.grad_accum,
                                       step_scheduler_with_optimizer=False)
        self.device = self.accelerator.device
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.channels_last = self.device.type == "cuda" if self.cfg.channels_last == "auto" else self.cfg.channels_last
        self.compile = self.cfg.compile
        if self.compile:
            check_compile_available(self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self._make_loader("train", seed=0)  # fails early (clear message) if the shards lack a resolution
        self._build()

    # -- building -------------------------------------------------------------------------------------

    def _resume_path(self) -> Path | None:
        resume = self.run_cfg.resume
        if resume == "never":
            found = checkpoint.latest_checkpoint(self.run_dir)
            if found is not None:
                raise ValueError(f"{self.run_dir} already holds checkpoint {found}; use resume=auto to continue "
                                 "it or choose another run_dir")
            return None
        if resume == "auto":
            return checkpoint.latest_checkpoint(self.run_dir)
        return checkpoint.resolve_checkpoint(resume)

    def _build(self) -> None:
        cfg = self.cfg
        seed_everything(self.run_cfg.seed)  # same initial weights on every rank
        model = build_model(self.stage)
        self.diffusion = build_diffusion(self.stage)
        self.sampler = make_timestep_sampler(self.stage.diffusion.timestep_sampler, self.diffusion.num_timesteps)
        self.loss_fn = make_stage_loss(self.stage, self.diffusion, self.sampler, cfg.p_uncond)
        self.resume_from = self._resume_path()
        state = None
        if self.resume_from is not None:
            record = checkpoint.load_config(self.resume_from)
            # through StageConfig: a record written before a field existed compares with its default
            diff = _stage_differences(type(self.stage).from_dict(record["stage"]).to_dict(), self.stage.to_dict())
            if diff:
                raise ValueError(f"cannot resume from {self.resume_from}: its stage configuration differs from "
                                 f"this run's ({'; '.join(diff)})")
            model.load_state_dict(checkpoint.load_weights(self.resume_from, "model"))
            state = checkpoint.load_training_state(self.resume_from)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.ema = EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup)
        optimizer, self.scheduler, self.fused = make_optimizer(model, cfg, self.device)
        self.step = 0
        self.nan_total = torch.zeros((), dtype=torch.long, device=self.device)
        self.nan_in_row = torch.zeros((), dtype=torch.long, device=self.device)
        if state is not None:
            self.ema.load_state_dict(checkpoint.load_weights(self.resume_from, "ema", device=str(self.device)),
                                     int(state["ema_num_updates"]))
            optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.sampler.load_state_dict(state["timestep_sampler"])
            self.step = int(state["step"])
            self.nan_total.fill_(int(state["nan"]["total"]))
            self.nan_in_row.fill_(int(state["nan"]["in_row"]))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if state is not None and "grad_scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        self.resume_state = state
        self.train_step = TrainStep(self.accelerator, self.model, self.optimizer, self.scheduler, self.ema,
                                    self.loss_fn, self.sampler, grad_clip=cfg.grad_clip, fused=self.fused,
                                    mixed_precision=self.mixed_precision, nan_total=self.nan_total,
                                    nan_in_row=self.nan_in_row, compile=self.compile)

    def _new_segment(self, step: int, rng: list[dict] | None = None) -> None:
        """Start the data segment at ``step``: RNG states and a fresh loader seeded from (seed, step, rank)."""
        seed = segment_seed(self.run_cfg.seed, step, self.rank)
        if rng is not None and len(rng) == self.world_size:
            set_rng_state(rng[self.rank])
        else:
            seed_everything(seed)
        self.segment_rng = get_rng_state()
        loader = self._make_loader("train", seed=seed)
        self.segment_start = step
        self.batches = self._forever(loader)

    def _forever(self, loader) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            empty = True
            for batch in loader:
                empty = False
                yield self._to_device(batch)
            if empty:
                raise ValueError(f"the train split of {self.run_cfg.data.root} yielded no batch")

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in batch.items():
            v = v.to(self.device, non_blocking=True)
            if self.channels_last and v.ndim == 4:
                v = v.contiguous(memory_format=torch.channels_last)
            out[k] = v
        return out

    def _make_loader(self, split: str, seed: int):
        data = self.run_cfg.data
        return make_stage_loader(data.root, split=split, resolution=self.stage.resolution,
                                 low_resolution=self.stage.low_resolution, batch_size=self.cfg.batch_size,
                                 seed=seed, rank=self.rank, world_size=self.world_size,
                                 num_workers=data.num_workers, shuffle_buffer=data.shuffle_buffer,
                                 pin_memory=self.device.type == "cuda")

    def _val_batch(self) -> dict[str, torch.Tensor]:
        """The first sample_count val examples (the conditioning of the SR sample grids)."""
        loader = make_stage_loader(self.run_cfg.data.root, split="val", resolution=self.stage.resolution,
                                   low_resolution=self.stage.low_resolution, batch_size=self.cfg.sample_count,
                                   rank=0, world_size=1, num_workers=0)
        batch = next(iter(loader))
        return {k: batch[k] for k in ("x", "x_low", "y")}

    # -- checkpoints and logs --------------------------------------------------------------------------

    def _weight_fingerprint(self) -> float:
        """Sum of all weights (float64): equal on every rank while the replicas agree."""
        model = self.accelerator.unwrap_model(self.model)
        return float(sum(p.detach().double().sum() for p in model.parameters()))

    def _save(self) -> Path:
        per_rank = [{"rng": self.segment_rng, "fingerprint": self._weight_fingerprint()}]
        per_rank = gather_object(per_rank) if self.world_size > 1 else per_rank
        path = None
        if self.accelerator.is_main_process:
            state = {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema_num_updates": self.ema.num_updates,
                "timestep_sampler": self.sampler.state_dict(),
                "nan": {"total": int(self.nan_total), "in_row": int(self.nan_in_row)},
                "data": {"segment_start": self.segment_start, "world_size": self.world_size},
                "rng": [r["rng"] for r in per_rank],
                "rank_weight_fingerprints": [r["fingerprint"] for r in per_rank],
            }
            if self.accelerator.scaler is not None:
                state["grad_scaler"] = self.accelerator.scaler.state_dict()
            train = {**self.run_cfg.to_dict(), **self.extra_config, "mixed_precision_resolved": self.mixed_precision,
                     "num_processes": self.world_size, "dataset": {k: self.dataset_info.get(k) for k in
                                                                   ("num_classes", "class_names", "resolutions")}}
            model = self.accelerator.unwrap_model(self.model)
            path = checkpoint.save_checkpoint(
                self.run_dir, self.step, weights={"model": model.state_dict(), "ema": self.ema.state_dict()},
                training_state=state, config={"stage": self.stage.to_dict(), "train": train},
                keep_last=self.cfg.keep_last)
        self.accelerator.wait_for_everyone()
        return path if path is not None else self.run_dir / checkpoint.CHECKPOINTS_DIR / checkpoint.step_dir_name(self.step)

    def _reset_window(self) -> None:
        self.win = new_window(self.device)
        self.win_steps = 0
        self.win_time = time.perf_counter()

    def _check_nonfinite(self) -> None:
        """Host check (a sync point): stop after max_nan_in_row non-finite steps in a row."""
        worst = int(self.accelerator.reduce(self.win["max_in_row"].clone(), "max"))
        if worst >= self.cfg.max_nan_in_row:
            last = checkpoint.latest_checkpoint(self.run_dir)
            raise NonFiniteLossError(
                f"stopping at step {self.step}: the loss was NaN or infinite for {worst} steps in a row "
                f"(trainer.max_nan_in_row={self.cfg.max_nan_in_row}); "
                + (f"the last good checkpoint is {last}" if last else "no checkpoint was written"))

    def _log(self, bar) -> None:
        acc = self.accelerator
        win = {k: acc.reduce(v.clone(), "sum") for k, v in self.win.items() if k != "max_in_row"}
        seconds = time.perf_counter() - self.win_time
        steps = max(self.win_steps, 1)
        images = self.win_steps * self.cfg.batch_size * self.cfg.grad_accum * self.world_size
        loss_sum, grad_sum = float(win["loss"]) / self.world_size, float(win["grad_norm"]) / self.world_size
        q_sum, q_count = win["q_sum"].tolist(), win["q_count"].tolist()
        record = {"step": self.step, "loss": loss_sum / steps,
                  **{f"loss_q{i}": (q_sum[i] / q_count[i] if q_count[i] else None) for i in range(4)},
                  "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_sum / steps,
                  "img_per_s": images / seconds if seconds > 0 else None, "nan_skips": int(self.nan_total)}
        if self.stage.kind is StageKind.classifier:
            record["accuracy"] = float(win["correct"]) / max(float(win["seen"]), 1.0)
        self._check_nonfinite()
        if acc.is_main_process:
            self.metrics.write(record)
            acc.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=self.step)
            bar.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['img_per_s'] or 0:.1f}", refresh=False)
        self._reset_window()

    @torch.no_grad()
    def _write_samples(self) -> Path | None:
        """A PNG grid of EMA samples: classes × samples (base) or low-res | sample | real rows (SR)."""
        path = None
        if self.accelerator.is_main_process and self.stage.kind != "classifier":
            n = self.cfg.sample_count
            diffusion = self.diffusion.respace(str(self.cfg.sample_steps))
            generator = torch.Generator(self.device).manual_seed(self.run_cfg.seed)
            res = self.stage.resolution
            if self.stage.kind is StageKind.base:
                classes = min(self.stage.num_classes, n)
                y = torch.arange(classes, device=self.device).repeat_interleave(n)
                images = sample_ddpm(self.ema.model, diffusion, (len(y), 3, res, res), model_kwargs={"y": y},
                                     generator=generator)
                grid = image_grid(images, ncol=n)
            else:
                val = {k: v.to(self.device) for k, v in self.val_batch.items()}
                noise = torch.randn(val["x_low"].shape, generator=generator, device=self.device)
                x_low, aug_level = condition_low_res(val["x_low"], self.stage.sampling.aug_level, noise=noise)
                images = sample_ddpm(self.ema.model, diffusion, (len(val["y"]), 3, res, res), generator=generator,
                                     model_kwargs={"y": val["y"], "x_low": x_low, "aug_level": aug_level})
                rows = torch.cat([upsample(val["x_low"], res), images, val["x"]])
                grid = image_grid(rows, ncol=len(val["y"]))
            out_dir = self.run_dir / SAMPLES_DIR
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"step-{self.step:08d}.png"
            grid.save(path)
        self.accelerator.wait_for_everyone()
        return path

    # -- the loop ---------------------------------------------------------------------------------------

    def _train_step(self) -> None:
        self.train_step([next(self.batches) for _ in range(self.cfg.grad_accum)], self.win)
        self.win_steps += 1
        self.step += 1

    def run(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        wants_val = cfg.sample_every and self.stage.kind is StageKind.sr and acc.is_main_process
        self.val_batch = self._val_batch() if wants_val else None
        state = self.resume_state
        self._new_segment(self.step, rng=state["rng"] if state is not None else None)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.metrics = MetricsLog(self.run_dir / METRICS_FILE, self.step if state is not None else None)
            acc.init_trackers("train")
        if self.resume_from is not None and acc.is_main_process:
            print(f"resuming {self.stage.name} from {self.resume_from} (step {self.step})", file=sys.stderr)
        self._reset_window()
        last_saved = self.resume_from  # what a run resumed at or past max_steps returns
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.stage.name, unit="step",
                   disable=not (cfg.progress and acc.is_main_process), dynamic_ncols=True)
        self.model.train()
        while self.step < cfg.max_steps:
            self._train_step()
            bar.update(1)
            at_ckpt = bool(cfg.ckpt_every) and self.step % cfg.ckpt_every == 0
            if self.step % cfg.log_every == 0 or at_ckpt or self.step == cfg.max_steps:
                self._log(bar)
            paused = time.perf_counter()
            if at_ckpt or self.step == cfg.max_steps:
                self._new_segment(self.step)
                last_saved = self._save()
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self._write_samples()
            self.win_time += time.perf_counter() - paused  # images/s measures training only
        bar.close()
        acc.end_training()
        return Path(last_saved)


def train_stage(stage, run: RunConfig, *, extra_config: dict[str, Any] | None = None) -> Path:
    """Train ``stage`` (a `cascade.config.StageConfig`, e.g. `stages.get_stage(...)`) per ``run``; return the final checkpoint folder."""
    return StageTrainer(stage, run, extra_config=extra_config).run()


__all__ = [
    "ClassifierLoss",
    "DiffusionLoss",
    "NonFiniteLossError",
    "RunConfig",
    "SRDiffusionLoss",
    "StageTrainer",
    "TrainStep",
    "TrainerConfig",
    "drop_labels",
    "make_accelerator",
    "make_optimizer",
    "make_stage_loss",
    "native_bf16",
    "new_window",
    "resolve_mixed_precision",
    "segment_seed",
    "train_stage",
]
