"""The stage trainer: one stage (base, super-resolution or classifier) from shards to checkpoints.

accelerate handles devices, mixed precision, gradient accumulation and distribution (one CPU, one GPU,
`accelerate launch` / `torchrun` over many; gloo on CPU). Per step: null-class dropout (p_uncond) for
classifier-free guidance, conditioning augmentation of the low-resolution input for SR stages, the
stage's diffusion loss (or cross-entropy on noised images for the classifier), AdamW with warmup and
clipping, then an EMA update.

Exact resume: every `SEGMENT_STEPS` steps a new data *segment* starts at step S: all its randomness (the
loader's shuffle, noise, timesteps, dropout, augmentation) is seeded from (seed, S, rank). A checkpoint
stores each rank's RNG states at its segment's start and at its own step; a run resumed from it rebuilds
the segment's loader, skips the batches already trained on and restores the RNG states, so it replays
exactly what the uninterrupted run did, whichever steps were checkpointed or interrupted. (The final
checkpoint starts a segment, so extending a finished run continues from there, not from where an
uninterrupted longer run would be.)

A distilled stage (``stage.distill``, `cascade.training.distill`) trains the same way: its loss is the teacher's
guided predictions as targets, and a new run starts from the teacher's EMA weights.

Non-finite losses skip the optimizer step on the device (`cascade.training.step`); before every step the
loop stops with `NonFiniteLossError` once trainer.max_nan_in_row steps in a row were non-finite, writing no
checkpoint of that state (`cascade.training.stopping`: never stalling a GPU).

Interrupts and damage: a stop signal during `run()` (SIGINT from Ctrl-C; SIGTERM, which Slurm, Kubernetes,
`docker stop` and `timeout` send on preemption; SIGUSR1, Slurm's `--signal` warning) lets the current step
finish, writes a checkpoint at that step (the same atomic kind as any other, so a resumed run continues as
after any checkpoint; a signal during a checkpoint's write lets the write finish) and raises
`TrainingInterrupted` naming the signal; with several processes they agree on the step (one tiny CPU
all-reduce per step, which also carries the non-finite count: `cascade.training.stopping`).
`resume="auto"` skips a damaged newest checkpoint (warning naming it) for the newest readable one.
Training needs no val split: an SR stage's sample grid then takes its inputs from the train split.

Here: `StageTrainer`, its set-up, checkpoints and the loop. Its parts live beside it: the losses
(`cascade.training.losses`), one optimizer step (`cascade.training.step`), AdamW and the LR schedule
(`cascade.training.optimizer`), the resume point (`cascade.training.resume`), the metrics log
(`cascade.training.metrics_log`), the sample grids (`cascade.training.sample_grid`) and the process set-up
(precision, accelerate state, seeding: `cascade.training.runtime`). Watching the run: the start-up summary, the
records with their grids and quality proxy (`cascade.training.watch`, rules in `cascade.training.cadence`), the
progress bar or plain log lines (`cascade.training.progress`) and the trackers (`cascade.training.trackers`);
the power-function EMAs and their snapshots (`cascade.training.ema`, `cascade.training.posthoc_ema`). What stays
here (about 450 lines) is one thing: the state a checkpoint must hold and the loop that advances it, kept
together so that what is saved and what is resumed are read side by side.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from cascade import checkpoint
from cascade.config import StageKind
from cascade.data.shard_folder import read_dataset_info
from cascade.data.workers import resolve_num_workers
from cascade.ema_profiles import classic_ema_record
from cascade.errors import GracefulInterrupt, describe_failure, ensure_writable_dir
from cascade.locks import FolderLock
from cascade.nets.build import build_diffusion, build_model
from cascade.training.data_stream import (
    batches_on_device,
    check_classes,
    check_train_shards,
    make_train_loader,
)
from cascade.training.distill import DistillationLoss, init_student, load_teacher
from cascade.training.ema import EMA, EMAGroup, PowerEMA
from cascade.training.losses import make_stage_loss
from cascade.training.memory_format import choose_channels_last
from cascade.training.metrics_log import METRICS_FILE, MetricsLog, window_record
from cascade.training.optimizer import make_lr_schedule, make_optimizer
from cascade.training.posthoc_ema import SnapshotCadence, resume_power_ema, write_snapshot
from cascade.training.progress import ProgressDisplay
from cascade.training.resume import SEGMENT_STEPS, read_resume_point, resume_segment
from cascade.training.runtime import (
    check_compile_available,
    get_rng_state,
    make_run_accelerator,
    seed_everything,
    segment_seed,
    set_rng_state,
    warn,
)
from cascade.training.sample_grid import read_grid_inputs, write_sample_grid
from cascade.training.step import TrainStep, new_window
from cascade.training.stopping import NonFiniteLossError, StopCheck, TrainingInterrupted
from cascade.training.timestep_sampler import stage_timestep_sampler
from cascade.training.trackers import start_trackers
from cascade.training.trainer_config import RunConfig
from cascade.training.watch import Watcher, print_run_summary

__all__ = ["SAMPLES_DIR", "NonFiniteLossError", "StageTrainer", "TrainingInterrupted", "train_stage"]

SAMPLES_DIR = "samples"


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
        check_classes(self.dataset_info, stage, run.data.root)
        check_train_shards(run.data.root)

        self.accelerator, self.mixed_precision = make_run_accelerator(self.cfg, self.run_dir)
        self._closed = False
        self.device = self.accelerator.device
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.run_lock = FolderLock(self.run_dir, "run_dir", enabled=self.accelerator.is_main_process)  # its writer
        self.channels_last = self.device.type == "cuda" if self.cfg.channels_last == "auto" else self.cfg.channels_last
        self.layout_probe = None  # the channels_last=auto measurement on CPU (cascade.training.memory_format.LayoutProbe)
        self.compile = self.cfg.compile
        try:
            self.run_lock.acquire()  # a second run on run_dir: FolderLocked (exit code 2) before it writes anything
            if self.compile:
                check_compile_available(self.device)
            self.num_workers = resolve_num_workers(self.run_cfg.data.num_workers, self.device)  # auto: by the cores
            self._make_loader(seed=0)  # fails early (clear message) if the shards lack a resolution
            # Interrupts are agreed on over CPU (gloo) every step, never synchronising an accelerator.
            self._stop_group = None
            if self.world_size > 1 and torch.distributed.get_backend() != "gloo":
                self._stop_group = torch.distributed.new_group(backend="gloo")
            self._build()
        except BaseException:
            self._close_after_failure()
            raise

    def close(self) -> None:
        """Finish the trackers, destroy the process group, drop the distributed wrappers, release run_dir; idempotent.
        `run()` calls it on every way out, construction on failure (gloo left to interpreter shutdown can abort)."""
        if self._closed:
            return
        self._closed = True
        acc = self.accelerator
        try:
            acc.end_training()  # trackers, then torch.distributed.destroy_process_group() in a multi-process run
            if getattr(self, "model", None) is not None:
                self.model = acc.unwrap_model(self.model)
                self.train_step = None
            self.batches = None  # the loader's worker processes end with it
            acc.free_memory()  # the accelerator's own references to the wrapped model and optimizer; gc.collect()
        finally:
            self.run_lock.release()  # last: trackers may write into run_dir until end_training returns

    def _close_after_failure(self) -> None:
        """`close` while an error propagates: a failure of its own is a warning, never the error reported."""
        try:
            self.close()
        except Exception as err:  # noqa: BLE001 - the original error matters more
            warn(f"closing the trainer after a failure also failed: {describe_failure(err)}")

    # -- building -------------------------------------------------------------------------------------

    def _build(self) -> None:
        cfg = self.cfg
        seed_everything(self.run_cfg.seed)  # same initial weights on every rank
        model = build_model(self.stage)
        self.diffusion = build_diffusion(self.stage)
        self.timestep_sampler = stage_timestep_sampler(self.stage.diffusion, self.diffusion)
        if self.stage.distill.takes_w:  # a student: the teacher's guided predictions are its targets
            self.loss_fn = DistillationLoss(self.stage, self.diffusion, load_teacher(self.stage, self.device))
        else:
            self.loss_fn = make_stage_loss(self.stage, self.diffusion, self.timestep_sampler, cfg.p_uncond)
        self.resume_from, model_w, ema_w, state = read_resume_point(
            self.run_dir, self.run_cfg.resume, self.stage, self.device, main_process=self.accelerator.is_main_process,
            model=model)
        recorded = (state or {}).get("data", {}).get("num_workers")
        if self.run_cfg.data.num_workers == "auto" and recorded is not None:
            self.num_workers = int(recorded)  # the same data stream as before the pause: keep its worker count
        if model_w is not None:
            model.load_state_dict(model_w)
        elif self.stage.distill.takes_w:
            init_student(model, self.stage.distill.teacher)  # a new student starts as its teacher
        model.to(self.device)
        if self.cfg.channels_last == "auto" and self.device.type == "cpu":
            # said with the progress bar only: without it stderr carries nothing but a failure's one line
            self.channels_last, self.layout_probe = choose_channels_last(
                model, self.stage, self.diffusion, cfg, state, world_size=self.world_size, device=self.device,
                autocast=self.accelerator.autocast, say=self.accelerator.is_main_process and cfg.progress,
                loss_fn=self.loss_fn)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.ema = EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup)
        # power-function EMAs and their snapshots for post-hoc EMA (cascade.training.posthoc_ema); () turns them off
        self.power_ema = PowerEMA(model, cfg.ema_sigma_rels) if cfg.ema_sigma_rels else None
        self.snapshot_cadence = SnapshotCadence(cfg.ema_snapshot_every, cfg.max_steps, cfg.max_seconds)
        optimizer, self.scheduler, self.fused = make_optimizer(model, cfg, self.device)
        self.step = 0
        self.nan_total = torch.zeros((), dtype=torch.long, device=self.device)
        self.nan_in_row = torch.zeros((), dtype=torch.long, device=self.device)
        if state is not None:
            self.ema.load_state_dict(ema_w, int(state["ema_num_updates"]))
            if self.power_ema is not None:
                resume_power_ema(self.power_ema, state.get("power_ema"), int(state["step"]),
                                 say=self.accelerator.is_main_process)
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
        self.train_step = TrainStep(self.accelerator, self.model, self.optimizer, self.scheduler,
                                    EMAGroup(self.ema, self.power_ema),
                                    self.loss_fn, self.timestep_sampler, grad_clip=cfg.grad_clip, fused=self.fused,
                                    mixed_precision=self.mixed_precision, nan_total=self.nan_total,
                                    nan_in_row=self.nan_in_row, compile=self.compile)

    def _new_segment(self, step: int, rng: list[dict] | None = None, *, resume_at: int | None = None,
                     rng_at: dict | None = None) -> None:
        """Start the data segment at ``step``: RNG states and a fresh loader seeded from (seed, step, rank); resuming
        within it at step ``resume_at``, skip the batches of the steps before and restore ``rng_at``."""
        seed = segment_seed(self.run_cfg.seed, step, self.rank)
        if rng is not None and len(rng) == self.world_size:
            set_rng_state(rng[self.rank])
        else:
            seed_everything(seed)
        self.segment_rng = get_rng_state()
        self.segment_start = step
        self.batches = batches_on_device(self._make_loader(seed), self.device, channels_last=self.channels_last,
                                         root=self.run_cfg.data.root)
        if resume_at is not None:
            for _ in range((resume_at - step) * self.cfg.grad_accum):
                next(self.batches)
            set_rng_state(rng_at)

    def _make_loader(self, seed: int):
        return make_train_loader(self.run_cfg.data, self.stage, batch_size=self.cfg.batch_size, seed=seed,
                                 rank=self.rank, world_size=self.world_size, num_workers=self.num_workers,
                                 device=self.device)

    # -- checkpoints and logs --------------------------------------------------------------------------

    def _save(self) -> Path:
        """A checkpoint at this step (main process; every process waits): weights, EMA, the training state with
        every rank's RNG states and weight fingerprint (the sum of its weights in float64: equal on every rank
        while the replicas agree), the configuration and the dataset record."""
        model = self.accelerator.unwrap_model(self.model)
        fingerprint = float(sum(p.detach().double().sum() for p in model.parameters()))
        per_rank = [{"rng": self.segment_rng, "rng_at_step": get_rng_state(), "fingerprint": fingerprint}]
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
                "rng_at_step": [r["rng_at_step"] for r in per_rank],
                "rank_weight_fingerprints": [r["fingerprint"] for r in per_rank],
            }
            if self.accelerator.scaler is not None:
                state["grad_scaler"] = self.accelerator.scaler.state_dict()
            if self.power_ema is not None:
                state["power_ema"] = self.power_ema.state_dict()
            train = {**self.run_cfg.to_dict(), **self.extra_config, "mixed_precision_resolved": self.mixed_precision,
                     "num_processes": self.world_size, "dataset": {k: self.dataset_info.get(k) for k in
                                                                   ("num_classes", "class_names", "resolutions")}}
            path = checkpoint.save_checkpoint(
                self.run_dir, self.step, weights={"model": model.state_dict(), "ema": self.ema.state_dict()},
                training_state=state, config={"stage": self.stage.to_dict(), "train": train, "ema": classic_ema_record(
                    self.cfg.ema_decay, self.cfg.ema_warmup, self.ema.num_updates, self.cfg.warmup_steps)},
                keep_last=self.cfg.keep_last)
        self.accelerator.wait_for_everyone()
        return path if path is not None else self.run_dir / checkpoint.CHECKPOINTS_DIR / checkpoint.step_dir_name(self.step)

    def _reset_window(self) -> None:
        self.win = new_window(self.device)
        self.win_steps = 0
        self.win_time = time.perf_counter()

    def _check_nonfinite(self) -> None:
        """Host check of the logging window (a sync point): stop after max_nan_in_row non-finite steps in a row."""
        worst = int(self.accelerator.reduce(self.win["max_in_row"].clone(), "max"))
        self.stop_check.check_count(worst, self.step)

    def _log(self) -> dict[str, Any]:
        """The logging window's record (every process; `Watcher.after_record` writes it), a new window."""
        acc = self.accelerator
        sums = {k: acc.reduce(v.clone(), "sum") for k, v in self.win.items() if k != "max_in_row"}
        images = self.win_steps * self.cfg.batch_size * self.cfg.grad_accum * self.world_size
        record = window_record(sums, step=self.step, steps=self.win_steps, images=images,
                               seconds=time.perf_counter() - self.win_time, world_size=self.world_size,
                               lr=self.step_lr, nan_skips=int(self.nan_total),
                               classifier=self.stage.kind is StageKind.classifier)
        self._check_nonfinite()
        self._reset_window()
        return record

    def _local_window(self) -> dict[str, Any]:
        """This process's view of the open window (no collective): a plain log line between records."""
        seconds = time.perf_counter() - self.win_time
        images = self.win_steps * self.cfg.batch_size * self.cfg.grad_accum * self.world_size
        return {"loss": float(self.win["loss"]) / self.win_steps if self.win_steps else None, "lr": self.step_lr,
                "img_per_s": images / seconds if self.win_steps and seconds > 0 else None}

    def _write_samples(self) -> Path | None:
        """A PNG grid of EMA samples (`cascade.training.sample_grid`), sampled with the stage's own
        `SamplingSettings` over trainer.sample_steps; the main process writes it, every process waits."""
        path = None
        if self.accelerator.is_main_process and self.stage.kind is not StageKind.classifier:
            path = write_sample_grid(self.run_dir / SAMPLES_DIR / f"step-{self.step:08d}.png", self.ema.model,
                                     self.diffusion, self.stage, steps=self.cfg.sample_steps,
                                     count=self.cfg.sample_count, seed=self.run_cfg.seed, device=self.device,
                                     inputs=self.val_batch)
        self.accelerator.wait_for_everyone()
        return path

    # -- the loop ---------------------------------------------------------------------------------------

    def _train_step(self) -> None:
        self.train_step([next(self.batches) for _ in range(self.cfg.grad_accum)], self.win)
        self.step_lr = self.train_step.last_lr
        self.win_steps += 1
        self.step += 1
        self.stop_check.record(self.step)

    def _out_of_time(self, started: float) -> bool:
        """trainer.max_seconds spent since `started` (on any rank: every rank stops at the same step)."""
        if not self.cfg.max_seconds:
            return False
        spent = time.perf_counter() - started >= self.cfg.max_seconds
        if self.world_size > 1:  # a per-step all-reduce, only for runs with a time budget
            spent = bool(self.accelerator.reduce(torch.tensor(float(spent), device=self.device), "max"))
        return spent

    def run(self) -> Path:
        """Train to max_steps; returns the final checkpoint folder. A stop signal (SIGINT, SIGTERM, SIGUSR1) →
        checkpoint at the current step, `TrainingInterrupted`; max_nan_in_row non-finite steps in a row →
        `NonFiniteLossError`. Runs once: the trainer is closed (`close`) however the run ends; RuntimeError on a
        second call."""
        if self._closed:
            raise RuntimeError("this StageTrainer has already run (or was closed); build a new one to train again")
        with GracefulInterrupt() as interrupt:  # also over closing: a signal then finds the run complete
            try:
                final = self._run(interrupt)
            except BaseException:
                self._close_after_failure()
                raise
            self.close()
        return final

    def _run(self, interrupt: GracefulInterrupt) -> Path:
        cfg, acc = self.cfg, self.accelerator
        wants_val = cfg.sample_every and self.stage.kind is StageKind.sr and acc.is_main_process
        self.val_batch = (read_grid_inputs(self.run_cfg.data.root, self.dataset_info, self.stage, cfg.sample_count)
                          if wants_val else None)
        state = self.resume_state
        start, rng, rng_at = resume_segment(state, self.step, self.world_size, self.rank)
        self._new_segment(start, rng, resume_at=None if rng_at is None else self.step, rng_at=rng_at)
        if acc.is_main_process:  # run_dir exists: its lock is held there
            self.metrics = MetricsLog(self.run_dir / METRICS_FILE, self.step if state is not None else None)
            start_trackers(acc, {"stage": self.stage.to_dict(), "train": self.run_cfg.to_dict()})
        if self.resume_from is not None and acc.is_main_process:
            print(f"resuming {self.stage.name} from {self.resume_from} (step {self.step})", file=sys.stderr)
        if acc.is_main_process:
            print_run_summary(self)
        self.progress = ProgressDisplay(self.stage.name, start_step=self.step, max_steps=cfg.max_steps,
                                        max_seconds=cfg.max_seconds, log_seconds=cfg.log_seconds, bar=cfg.progress,
                                        enabled=acc.is_main_process)
        try:
            self.watch = Watcher(self, self.progress, start_step=self.step)  # builds the quality proxy
            self._reset_window()
            self.stop_check = StopCheck(self.nan_in_row, limit=cfg.max_nan_in_row, run_dir=self.run_dir,
                                        world_size=self.world_size, group=self._stop_group)
            last_saved = self.resume_from  # what a run resumed at or past max_steps returns
            saved_step = self.step if self.resume_from is not None else 0
            self.model.train()
            final = self._loop(interrupt, last_saved, saved_step)
        finally:
            self.progress.close()
        self.watch.finish()
        return final

    def _loop(self, interrupt: GracefulInterrupt, last_saved: Path | None, saved_step: int) -> Path:
        cfg = self.cfg
        started = time.perf_counter()
        while self.step < cfg.max_steps:
            # Stop on a signal, all processes at one step with a checkpoint there (non-finite limit first).
            signum = self.stop_check.check(interrupt)
            if signum:
                if self.step != saved_step:  # a checkpoint at this step, as at any other, and its grid
                    record = self._log() if self.win_steps else None
                    last_saved = self._save()
                    self.watch.after_record(record, last=True, interrupted=True)
                raise TrainingInterrupted(self.step, None if last_saved is None else Path(last_saved), signum)

            # One optimizer step over grad_accum micro-batches.
            self._train_step()
            self.progress.advance(self.step)
            out_of_time = self._out_of_time(started)  # trainer.max_seconds: a wall-clock budget
            last = self.step == cfg.max_steps or out_of_time
            at_ckpt = bool(cfg.ckpt_every) and self.step % cfg.ckpt_every == 0

            # Log the window (a host synchronisation; also checks for too many non-finite steps in a row).
            record = None
            if self.step % cfg.log_every == 0 or at_ckpt or last or self.watch.forces_log(self.step):
                record = self._log()
            paused = time.perf_counter()

            # A new data segment every SEGMENT_STEPS and at the end; a checkpoint (exact resume either way).
            if last or self.step % SEGMENT_STEPS == 0:
                self._new_segment(self.step)
            # A post-hoc EMA snapshot (main process), before the checkpoint: a resume from it never misses one.
            if self.accelerator.is_main_process and self.power_ema and self.snapshot_cadence.due(self.step, last):
                write_snapshot(self.run_dir, self.power_ema, self.step)
            if at_ckpt or last:
                last_saved = self._save()
                saved_step = self.step

            # The record with the sample grid and quality proxy due at its step (`cascade.training.cadence`).
            if record is not None:
                self.watch.after_record(record, last=last)
            elif self.progress.due():  # a slow run still speaks every trainer.log_seconds
                self.progress.line(**self._local_window())
            self.win_time += time.perf_counter() - paused  # images/s measures training only
            if out_of_time:
                break
        return Path(last_saved)


def train_stage(stage, run: RunConfig, *, extra_config: dict[str, Any] | None = None) -> Path:
    """Train ``stage`` (a `cascade.config.StageConfig`, e.g. `stages.get_stage(...)`) per ``run``; return the final checkpoint folder."""
    return StageTrainer(stage, run, extra_config=extra_config).run()
