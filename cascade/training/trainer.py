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
steps, where too many non-finite steps in a row stop the run with `NonFiniteLossError`. A skipped step
advances neither the EMA warm-up nor anything logged as trained; the `lr` logged at step n is the rate step n
used.

Interrupts and damage: a SIGINT (Ctrl-C) during `run()` lets the current step finish, writes a checkpoint
at that step (the same atomic kind as any other, so a resumed run continues as after any checkpoint) and
raises `TrainingInterrupted`; with several processes they agree on the step (one tiny CPU all-reduce per
step). `resume="auto"` skips a damaged newest checkpoint (warning naming it) for the newest readable one.
Training needs no val split: an SR stage's sample grid then takes its inputs from the train split.

The losses live in `cascade.training.losses` and the process set-up (precision, accelerate state, seeding) in
`cascade.training.runtime`; what stays here is one cohesive thing, the `StageTrainer`, whose set-up, loop, checkpoints,
logs and sample grids share its state.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, is_tensorboard_available
from tqdm.auto import tqdm

from cascade import checkpoint
from cascade.config import StageKind
from cascade.data.loader import make_stage_loader
from cascade.data.shard_folder import read_dataset_info
from cascade.data.workers import resolve_num_workers
from cascade.device import native_bf16, resolve_mixed_precision
from cascade.diffusion.augment import condition_low_res
from cascade.diffusion.guidance import classifier_free_guidance
from cascade.diffusion.samplers import SAMPLERS
from cascade.errors import GracefulInterrupt, Interrupted, describe_failure, ensure_writable_dir
from cascade.imageops import image_grid, upsample
from cascade.nets.build import build_diffusion, build_model
from cascade.training.ema import EMA
from cascade.training.losses import (
    ClassifierLoss,
    DiffusionLoss,
    SRDiffusionLoss,
    drop_labels,
    example_batch,
    make_stage_loss,
)
from cascade.training.memory_format import probe_channels_last
from cascade.training.runtime import (
    check_compile_available,
    get_rng_state,
    make_accelerator,
    seed_everything,
    segment_seed,
    set_rng_state,
)
from cascade.training.timestep_sampler import TimestepSampler, UniformSampler, make_timestep_sampler
from cascade.training.trainer_config import RunConfig, TrainerConfig

METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "xpu")
# trainer.channels_last=auto measures the layouts on CPU only for runs with at least this many steps to go (or a
# time budget): the probe costs about 8 training steps' forward + backward.
PROBE_MIN_STEPS = 200


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN or infinite loss."""


class TrainingInterrupted(Interrupted):
    """SIGINT stopped the run at ``step``; ``checkpoint`` holds that step (None if nothing was trained)."""

    def __init__(self, step: int, checkpoint_path: Path | None):
        self.step, self.checkpoint = step, checkpoint_path
        super().__init__(f"interrupted at step {step}; run the same command to resume")


def _warn(message: str) -> None:
    """A one-line warning on stderr (no source line, unlike `warnings.warn`'s default format)."""
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- setup
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

# ----------------------------------------------------------------------------------------------- one step

def make_optimizer(model: torch.nn.Module, cfg: TrainerConfig, device: torch.device):
    """(AdamW, LR scheduler, fused) of a run: AdamW (fused on CPU/CUDA/XPU) with linear warmup to lr over
    ``cfg.warmup_steps``, then constant."""
    fused = device.type in FUSED_ADAMW_DEVICES
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay, fused=fused)
    return optimizer, make_lr_schedule(optimizer, cfg), fused


def make_lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainerConfig, steps_taken: int = 0):
    """The run's LR schedule (linear warmup to ``cfg.lr`` over ``cfg.warmup_steps``, then constant) positioned after
    ``steps_taken`` optimizer steps, with ``cfg``'s optimizer settings (lr, betas, eps, weight decay) written into
    every parameter group. A resumed run calls it after loading the optimizer's state, so settings changed on the
    command line take effect (the Adam moments and step counts stay those of the checkpoint)."""
    for group in optimizer.param_groups:
        group.update(lr=cfg.lr, initial_lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                     weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0,
                                             last_epoch=steps_taken - 1)


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
            kept = [ln for ln in path.read_text(errors="replace").splitlines() if self._step_of(ln) is not None
                    and self._step_of(ln) <= resume_step]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            tmp.replace(path)

    @staticmethod
    def _step_of(line: str) -> int | None:
        """The step of a record line, None for a blank or cut-off one (a run killed mid-write)."""
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return None

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
        ensure_writable_dir(self.run_dir, "run_dir")  # before anything is built or trained
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
        self._closed = False
        self.device = self.accelerator.device
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.channels_last = self.device.type == "cuda" if self.cfg.channels_last == "auto" else self.cfg.channels_last
        self.layout_probe = None  # the channels_last=auto measurement on CPU (cascade.training.memory_format.LayoutProbe)
        self.compile = self.cfg.compile
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        try:
            if self.compile:
                check_compile_available(self.device)
            self.num_workers = resolve_num_workers(self.run_cfg.data.num_workers, self.device)  # auto: by the cores
            self._make_loader("train", seed=0)  # fails early (clear message) if the shards lack a resolution
            # Interrupts are agreed on over CPU (gloo) every step, never synchronising an accelerator.
            self._stop_group = None
            if self.world_size > 1 and torch.distributed.get_backend() != "gloo":
                self._stop_group = torch.distributed.new_group(backend="gloo")
            self._build()
        except BaseException:
            self._close_after_failure()
            raise

    def close(self) -> None:
        """Finish the trackers, destroy the process group and drop the distributed wrappers; idempotent. `run()`
        calls it on every way out, construction on failure. The process group's worker threads then end while the
        interpreter is alive: left to interpreter shutdown, gloo can abort the process (SIGABRT) as it exits."""
        if self._closed:
            return
        self._closed = True
        acc = self.accelerator
        acc.end_training()  # trackers, then torch.distributed.destroy_process_group() in a multi-process run
        if getattr(self, "model", None) is not None:
            self.model = acc.unwrap_model(self.model)
            self.train_step = None
        self.batches = None  # the loader's worker processes end with it
        acc.free_memory()  # the accelerator's own references to the wrapped model and optimizer; gc.collect()

    def _close_after_failure(self) -> None:
        """`close` while an error propagates: a failure of its own is a warning, never the error reported."""
        try:
            self.close()
        except Exception as err:  # noqa: BLE001 - the original error matters more
            _warn(f"closing the trainer after a failure also failed: {describe_failure(err)}")

    # -- building -------------------------------------------------------------------------------------

    def _resume_candidates(self) -> list[Path]:
        """Checkpoints to try, in order: resume=auto tries older ones when the newest is damaged."""
        resume = self.run_cfg.resume
        if resume == "never":
            found = checkpoint.latest_checkpoint(self.run_dir)
            if found is not None:
                raise ValueError(f"{self.run_dir} already holds checkpoint {found}; use resume=auto to continue "
                                 "it or choose another run_dir")
            return []
        if resume == "auto":
            return checkpoint.checkpoint_candidates(self.run_dir)
        return [checkpoint.resolve_checkpoint(resume)]

    def _read_resume_point(self) -> tuple[Path | None, dict | None, dict | None, dict | None]:
        """(folder, model weights, EMA weights, training state) of the newest readable checkpoint to resume."""
        candidates = self._resume_candidates()
        damaged = []
        for path in candidates:
            try:
                record = checkpoint.load_config(path)
                model_w = checkpoint.load_weights(path, "model")
                ema_w = checkpoint.load_weights(path, "ema", device=self.device)
                state = checkpoint.load_training_state(path)
            except checkpoint.CheckpointError as err:
                if self.run_cfg.resume != "auto":
                    raise
                damaged.append(path)
                if self.accelerator.is_main_process:
                    _warn(f"checkpoint {path} is damaged, skipping it: {err}")
                continue
            # through StageConfig: a record written before a field existed compares with its default
            diff = _stage_differences(type(self.stage).from_dict(record["stage"]).to_dict(), self.stage.to_dict())
            if diff:
                raise ValueError(f"cannot resume from {path}: its stage configuration differs from "
                                 f"this run's ({'; '.join(diff)})")
            if damaged and self.accelerator.is_main_process:
                _warn(f"resuming from the older checkpoint {path} instead of the damaged {damaged[0]}")
            return path, model_w, ema_w, state
        if damaged:
            raise ValueError(f"every checkpoint in {self.run_dir / checkpoint.CHECKPOINTS_DIR} is damaged (newest: "
                             f"{damaged[0]}); move them away to start afresh, or resume=PATH from a copy")
        return None, None, None, None

    def _build(self) -> None:
        cfg = self.cfg
        seed_everything(self.run_cfg.seed)  # same initial weights on every rank
        model = build_model(self.stage)
        self.diffusion = build_diffusion(self.stage)
        self.timestep_sampler = make_timestep_sampler(self.stage.diffusion.timestep_sampler, self.diffusion.num_timesteps)
        self.loss_fn = make_stage_loss(self.stage, self.diffusion, self.timestep_sampler, cfg.p_uncond)
        self.resume_from, model_w, ema_w, state = self._read_resume_point()
        recorded = (state or {}).get("data", {}).get("num_workers")
        if self.run_cfg.data.num_workers == "auto" and recorded is not None:
            self.num_workers = int(recorded)  # the same data stream as before the pause: keep its worker count
        if model_w is not None:
            model.load_state_dict(model_w)
        model.to(self.device)
        if self.cfg.channels_last == "auto" and self.device.type == "cpu":
            self.channels_last = self._auto_channels_last(model, state)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.ema = EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup)
        optimizer, self.scheduler, self.fused = make_optimizer(model, cfg, self.device)
        self.step = 0
        self.nan_total = torch.zeros((), dtype=torch.long, device=self.device)
        self.nan_in_row = torch.zeros((), dtype=torch.long, device=self.device)
        if state is not None:
            self.ema.load_state_dict(ema_w, int(state["ema_num_updates"]))
            optimizer.load_state_dict(state["optimizer"])
            # the schedule at the checkpoint's position, with this invocation's lr, betas, eps and weight decay
            self.scheduler = make_lr_schedule(optimizer, cfg, int(state["scheduler"]["last_epoch"]))
            self.timestep_sampler.load_state_dict(state["timestep_sampler"])
            self.step = int(state["step"])
            self.nan_total.fill_(int(state["nan"]["total"]))
            self.nan_in_row.fill_(int(state["nan"]["in_row"]))
        self.step_lr = self.scheduler.get_last_lr()[0]  # the rate of the last step taken (logged)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if state is not None and "grad_scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        self.resume_state = state
        self.train_step = TrainStep(self.accelerator, self.model, self.optimizer, self.scheduler, self.ema,
                                    self.loss_fn, self.timestep_sampler, grad_clip=cfg.grad_clip, fused=self.fused,
                                    mixed_precision=self.mixed_precision, nan_total=self.nan_total,
                                    nan_in_row=self.nan_in_row, compile=self.compile)

    def _auto_channels_last(self, model: torch.nn.Module, state: dict | None) -> bool:
        """``trainer.channels_last=auto`` on CPU: the layout a resumed run used, else the faster one measured on this
        machine (`cascade.training.memory_format.probe_channels_last`, a few forward + backward passes of a copy of the model
        at the run's batch size and precision). Runs with fewer than `PROBE_MIN_STEPS` steps to go and no time
        budget, and multi-process runs (every rank must agree), keep the contiguous layout."""
        if state is not None and "channels_last" in state:
            return bool(state["channels_last"])
        remaining = self.cfg.max_steps - (int(state["step"]) if state is not None else 0)
        if self.world_size > 1 or (remaining < PROBE_MIN_STEPS and not self.cfg.max_seconds):
            return False
        sampler = make_timestep_sampler(self.stage.diffusion.timestep_sampler, self.diffusion.num_timesteps)
        loss_fn = make_stage_loss(self.stage, self.diffusion, sampler, self.cfg.p_uncond)
        probe = probe_channels_last(model, loss_fn, example_batch(self.stage, self.cfg.batch_size, device=self.device),
                                    autocast=self.accelerator.autocast)
        # said with the progress bar only: without it stderr carries nothing but a failure's one line
        if self.accelerator.is_main_process and self.cfg.progress:
            print(probe.describe(), file=sys.stderr)
        self.layout_probe = probe
        return probe.channels_last

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
                                 num_workers=self.num_workers, shuffle_buffer=data.shuffle_buffer, hflip=data.hflip,
                                 pin_memory=self.device.type == "cuda")

    def _val_batch(self) -> dict[str, torch.Tensor]:
        """The first sample_count val examples (the conditioning of the SR sample grids); without a val
        split, the first train examples in shard order (with a warning)."""
        root = self.run_cfg.data.root
        sources = [("val", root)] if self.dataset_info["shards"].get("val") else []
        sources.append(("train", [str(Path(root) / n) for n in self.dataset_info["shards"]["train"]]))
        for split, source in sources:
            # read in val mode (each sample once, in shard order, no flips), whichever split it is
            loader = make_stage_loader(source, split="val", resolution=self.stage.resolution,
                                       low_resolution=self.stage.low_resolution, batch_size=self.cfg.sample_count,
                                       rank=0, world_size=1, num_workers=0)
            batch = next(iter(loader), None)
            if batch is not None:
                if split == "train":
                    _warn(f"{root} has no val samples; the sample grids take their low-resolution inputs from "
                          "the train split")
                return {k: batch[k] for k in ("x", "x_low", "y")}
        raise ValueError(f"no readable sample in {root} for the sample grids; rewrite the shards "
                         "(tools/make_shards.py) or set trainer.sample_every=0")

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
                "timestep_sampler": self.timestep_sampler.state_dict(),
                "nan": {"total": int(self.nan_total), "in_row": int(self.nan_in_row)},
                "channels_last": bool(self.channels_last),  # the layout a resumed run keeps (auto may measure anew)
                "data": {"segment_start": self.segment_start, "world_size": self.world_size,
                         "num_workers": self.num_workers},
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
                  "lr": self.step_lr, "grad_norm": grad_sum / steps,
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
        """A PNG grid of EMA samples: classes × samples (base) or low-res | sample | real rows (SR), sampled with
        the stage's own `SamplingSettings` (sampler, w, η, guidance interval, s) over trainer.sample_steps."""
        path = None
        if self.accelerator.is_main_process and self.stage.kind is not StageKind.classifier:
            n, settings = self.cfg.sample_count, self.stage.sampling
            diffusion = self.diffusion.respace(str(self.cfg.sample_steps))
            generator = torch.Generator(self.device).manual_seed(self.run_cfg.seed)
            res = self.stage.resolution
            model = self.ema.model
            if settings.w > 0:
                model = classifier_free_guidance(model, settings.w, self.stage.num_classes, settings.guidance_interval,
                                                 self.diffusion.num_timesteps)
            options = {"clip_denoised": settings.clip_denoised, "dynamic_threshold": settings.dynamic_threshold,
                       **({"eta": settings.eta} if settings.sampler == "ddim" else {})}
            sample = SAMPLERS[settings.sampler]
            if self.stage.kind is StageKind.base:
                classes = min(self.stage.num_classes, n)
                y = torch.arange(classes, device=self.device).repeat_interleave(n)
                images = sample(model, diffusion, (len(y), 3, res, res), model_kwargs={"y": y}, generator=generator,
                                **options)
                grid = image_grid(images, ncol=n)
            else:
                val = {k: v.to(self.device) for k, v in self.val_batch.items()}
                noise = torch.randn(val["x_low"].shape, generator=generator, device=self.device)
                x_low, aug_level = condition_low_res(val["x_low"], settings.aug_level, noise=noise)
                images = sample(model, diffusion, (len(val["y"]), 3, res, res), generator=generator,
                                model_kwargs={"y": val["y"], "x_low": x_low, "aug_level": aug_level}, **options)
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
        self.step_lr = self.train_step.last_lr
        self.win_steps += 1
        self.step += 1

    def _stop_requested(self, interrupt: GracefulInterrupt) -> bool:
        """Whether any process got SIGINT (all processes get the same answer at the same step)."""
        if self.world_size == 1:
            return interrupt.requested
        flag = torch.tensor([int(interrupt.requested)], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._stop_group)
        return bool(flag.item())

    def _out_of_time(self, started: float) -> bool:
        """trainer.max_seconds spent since `started` (on any rank: every rank stops at the same step)."""
        if not self.cfg.max_seconds:
            return False
        spent = time.perf_counter() - started >= self.cfg.max_seconds
        if self.world_size > 1:  # a per-step all-reduce, only for runs with a time budget
            spent = bool(self.accelerator.reduce(torch.tensor(float(spent), device=self.device), "max"))
        return spent

    def run(self) -> Path:
        """Train to max_steps; returns the final checkpoint folder. SIGINT → checkpoint, `TrainingInterrupted`.
        Runs once: the trainer is closed (`close`) however the run ends; RuntimeError on a second call."""
        if self._closed:
            raise RuntimeError("this StageTrainer has already run (or was closed); build a new one to train again")
        try:
            with GracefulInterrupt() as interrupt:
                final = self._run(interrupt)
        except BaseException:
            self._close_after_failure()
            raise
        self.close()
        return final

    def _run(self, interrupt: GracefulInterrupt) -> Path:
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
        saved_step = self.step if self.resume_from is not None else 0
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.stage.name, unit="step",
                   disable=not (cfg.progress and acc.is_main_process), dynamic_ncols=True)
        self.model.train()
        try:
            return self._loop(interrupt, bar, last_saved, saved_step)
        finally:
            bar.close()

    def _loop(self, interrupt: GracefulInterrupt, bar, last_saved: Path | None, saved_step: int) -> Path:
        cfg = self.cfg
        started = time.perf_counter()
        while self.step < cfg.max_steps:
            if self._stop_requested(interrupt):
                if self.step != saved_step:  # a checkpoint at this step, as at any other
                    if self.win_steps:
                        self._log(bar)
                    self._new_segment(self.step)
                    last_saved = self._save()
                raise TrainingInterrupted(self.step, None if last_saved is None else Path(last_saved))
            self._train_step()
            bar.update(1)
            out_of_time = self._out_of_time(started)  # trainer.max_seconds: a wall-clock budget
            last = self.step == cfg.max_steps or out_of_time
            at_ckpt = bool(cfg.ckpt_every) and self.step % cfg.ckpt_every == 0
            if self.step % cfg.log_every == 0 or at_ckpt or last:
                self._log(bar)
            paused = time.perf_counter()
            if at_ckpt or last:
                self._new_segment(self.step)
                last_saved = self._save()
                saved_step = self.step
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self._write_samples()
            self.win_time += time.perf_counter() - paused  # images/s measures training only
            if out_of_time:
                break
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
    "TrainingInterrupted",
    "drop_labels",
    "make_accelerator",
    "make_lr_schedule",
    "make_optimizer",
    "make_stage_loss",
    "native_bf16",
    "new_window",
    "resolve_mixed_precision",
    "segment_seed",
    "train_stage",
]
