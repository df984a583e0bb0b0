"""Watching a training run: its start-up summary (`summary_rows`, `print_run_summary`) and the `Watcher`, which
writes each logging window's record (metrics.jsonl, the trackers, the progress display) after taking the
sample grid and the quality proxy due at that step (rules: `cascade.training.cadence`). `docs/watching.md`
describes what a run prints and where its outputs go.

A grid's and a proxy's time is recorded in the record of their step (``grid_seconds``, ``proxy_seconds``) beside
the window's training time (``seconds``), and is kept out of img/s. Both run on the main process (the others
wait), on the EMA weights, inside `cascade.training.runtime.rng_kept`: the run's random stream, and so exact
resume, is the same with or without them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast

from cascade import checkpoint
from cascade.config import StageKind
from cascade.nets.build import count_parameters, forward_flops
from cascade.pipeline.plan import monitor_settings, stage_timesteps
from cascade.summary import format_count, print_summary
from cascade.training.cadence import (
    GRID_PARTS,
    PROXY_SHARE,
    first_proxy_estimate,
    grid_part,
    proxy_due,
    step_due,
)
from cascade.training.metrics_log import METRICS_FILE
from cascade.training.runtime import rng_kept, warn
from cascade.training.trackers import log_image, log_scalars, tracker_folders
from cascade.training.trainer_config import parse_report_to

__all__ = ["Watcher", "make_quality_proxy", "print_run_summary", "proxy_enabled", "summary_rows"]


def proxy_enabled(trainer) -> bool:
    """Whether the run scores the quality proxy: eval_every ≠ 0, a base or SR stage and, for eval_every=auto, a
    val split in the shards (the judge's reference; an explicit N without one is the proxy's own error)."""
    cfg = trainer.cfg
    if cfg.eval_every == 0 or trainer.stage.kind is StageKind.classifier:
        return False
    return cfg.eval_every != "auto" or bool(trainer.dataset_info["shards"].get("val"))


def make_quality_proxy(trainer):
    """The run's `cascade.evaluation.proxy.QualityProxy` (judge cached beside the shards), its lines on stderr."""
    from cascade.evaluation.proxy import QualityProxy

    return QualityProxy(trainer.run_cfg.data.root, trainer.stage, count=trainer.cfg.eval_count,
                        seed=trainer.run_cfg.seed, device=trainer.device, steps=trainer.cfg.sample_steps,
                        log=lambda line: print(line, file=sys.stderr, flush=True))


def _images(info: dict[str, Any]) -> str:
    counts = info.get("counts") or {}
    parts = [f"{split} {format_count(int(c['total']))}" for split, c in counts.items()
             if isinstance(c, dict) and "total" in c]
    return ", ".join(parts) if parts else "unknown"


def _grid_rule(trainer) -> str:
    every = trainer.cfg.sample_every
    if every == 0 or trainer.stage.kind is StageKind.classifier:
        return "off" if every == 0 else "none (classifier)"
    rule = (f"auto: {GRID_PARTS} per run (each quarter of max_steps or max_seconds) and at the end"
            if every == "auto" else f"every {every} steps and at the end")
    return f"{rule}; {trainer.cfg.sample_count} per class/input, {_monitor_sampling(trainer)}"


def _proxy_rule(trainer) -> str:
    cfg = trainer.cfg
    if trainer.stage.kind is StageKind.classifier:
        return "none (classifier)"
    if cfg.eval_every == 0:
        return "off"
    if not proxy_enabled(trainer):
        return "off (auto: the shards have no val split)"
    rule = (f"auto (≤ {PROXY_SHARE:.0%} of training time) and at the end" if cfg.eval_every == "auto"
            else f"every {cfg.eval_every} steps and at the end")
    return f"{rule}; {cfg.eval_count} samples, {_monitor_sampling(trainer)}"


def _monitor_sampling(trainer) -> str:
    """How the grids and the proxy sample: trainer.sample_steps steps, or a few-step student's own sampler."""
    stage = trainer.stage
    if stage.distill.method in ("step", "consistency"):
        return f"{stage.sampling.sampler} {stage.sampling.steps} steps (the student's)"
    return f"{trainer.cfg.sample_steps} steps"


def _distill_rule(stage) -> str:
    """What a student is distilled from and how (`cascade.training.distill`)."""
    spec = stage.distill
    how = {"guidance": "guidance distillation",
           "step": f"guided step distillation: {spec.levels} DDIM steps for the teacher's {spec.teacher_steps}",
           "consistency": f"guided consistency distillation on {spec.levels} levels"}[spec.method]
    return (f"{how}, from teacher {spec.teacher}; w ~ U[0, {spec.w_max:g}]; samples with {stage.sampling.sampler} "
            f"{stage.sampling.steps} steps")


def summary_rows(trainer) -> list[tuple[str, object]]:
    """The start-up summary of a `StageTrainer` (built, before its first step) as (name, value) rows."""
    cfg, stage, info, acc = trainer.cfg, trainer.stage, trainer.dataset_info, trainer.accelerator
    device = trainer.device
    device_text = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    model = acc.unwrap_model(trainer.model)
    with rng_kept():  # one forward of the EMA copy (some stages do not run on the meta device)
        flops = forward_flops(stage, trainer.ema.model)
    per_step = cfg.batch_size * cfg.grad_accum * trainer.world_size
    run_dir = trainer.run_dir
    names = parse_report_to(cfg.report_to)
    how_logged = "progress bar" if cfg.progress and sys.stderr.isatty() else "plain lines on stderr"
    layout = "channels_last" if trainer.channels_last else "contiguous"
    classes = info["class_names"]
    class_text = f"{len(classes)} ({', '.join(map(str, classes[:5]))}{', …' if len(classes) > 5 else ''})"
    plural = "es" if trainer.world_size > 1 else ""
    batch = (f"{cfg.batch_size} per process × {cfg.grad_accum} accumulated × {trainer.world_size} "
             f"= {per_step} images/step")
    ckpt_rule = f"every {cfg.ckpt_every} steps" if cfg.ckpt_every else "final only"
    shown = "progress bar" if how_logged == "progress bar" else f"plain lines on stderr every {cfg.log_seconds:g} s"
    metrics = f"{run_dir / METRICS_FILE} (every {cfg.log_every} steps; {shown})"
    return [
        ("stage", f"{stage.name} ({stage.kind.value}, {stage.resolution}²)"),
        *([("distilling", _distill_rule(stage))] if stage.distill.takes_w else []),
        ("size", trainer.extra_config.get("size", "unknown")),
        ("parameters", format_count(count_parameters(model))),
        ("forward FLOPs/image", format_count(flops)),
        ("device", f"{device_text} × {trainer.world_size} process{plural}"),
        ("mixed precision", f"{trainer.mixed_precision} (trainer.mixed_precision={cfg.mixed_precision})"),
        ("memory layout", f"{layout} (trainer.channels_last={cfg.channels_last})"),
        ("images", _images(info)),
        ("classes", class_text),
        ("resolutions", ", ".join(map(str, info["resolutions"]))),
        ("batch", batch),
        ("steps", f"{trainer.step} → {cfg.max_steps}"),
        ("time budget", f"{cfg.max_seconds:g} s" if cfg.max_seconds else "none"),
        ("resume", f"step {trainer.step} from {trainer.resume_from}" if trainer.resume_from else "fresh start"),
        ("run_dir", run_dir),
        ("checkpoints", f"{run_dir / checkpoint.CHECKPOINTS_DIR} ({ckpt_rule}, last {cfg.keep_last} kept)"),
        ("metrics", metrics),
        ("trackers", tracker_folders(names, run_dir)),
        ("sample grids", f"{run_dir / 'samples'}: {_grid_rule(trainer)}"),
        ("quality proxy", _proxy_rule(trainer)),
        ("EMA", _ema_rule(trainer)),
        ("run report", f"{run_dir / 'report.md'} at the end" if cfg.run_report else "off (trainer.run_report=false)"),
    ]


def _ema_rule(trainer) -> str:
    """The sampled EMA and the post-hoc EMA snapshots (`cascade.training.posthoc_ema`)."""
    cfg = trainer.cfg
    text = f"decay {cfg.ema_decay:g} (the weights sampled)"
    if trainer.power_ema is None:
        return text + "; post-hoc EMA off (trainer.ema_sigma_rels=[])"
    cadence = trainer.snapshot_cadence
    every = f"every {cadence.steps} steps" + (f" or {cadence.seconds:.0f} s" if cadence.seconds else "")
    widths = ", ".join(f"{r:g}" for r in cfg.ema_sigma_rels)
    return (f"{text}; post-hoc snapshots (σ_rel {widths}) to {trainer.run_dir / 'ema_snapshots'} {every} "
            "and at the end (tools/posthoc_ema.py)")


def print_run_summary(trainer) -> None:
    """`summary_rows` as the start-up block on stderr (`cascade.summary.print_summary`)."""
    doing = "distilling" if trainer.stage.distill.takes_w else "training"
    print_summary(f"{doing} {trainer.stage.name}", summary_rows(trainer))


class Watcher:
    """The grids, proxy and records of one `StageTrainer` run (built in its `run`, after the start-up summary).

    Construction builds the quality proxy on the main process (the others wait) when `proxy_enabled`. Every
    process then calls `after_record(record, last=...)` at each logging step, after the checkpoint; decisions
    are the main process's, broadcast, so every rank takes them at the same step. `forces_log(step)` names the
    steps a fixed cadence (sample_every=N, eval_every=N) needs a record at."""

    def __init__(self, trainer, progress, *, start_step: int, clock=time.perf_counter):
        self.t, self.progress, self.clock = trainer, progress, clock
        cfg = trainer.cfg
        self.grids = cfg.sample_every != 0 and trainer.stage.kind is not StageKind.classifier
        self.grid_part = grid_part(start_step, cfg.max_steps)  # parts a resumed run has already passed
        self.grid_step = None  # the step of the last grid
        self.started = clock()
        self.train_seconds = self.proxy_seconds = 0.0
        self.last_proxy: float | None = None
        self.proxy = None
        if proxy_enabled(trainer):
            if trainer.accelerator.is_main_process:
                with rng_kept():  # training the judge draws random numbers: not from the run's stream
                    self.proxy = make_quality_proxy(trainer)
                print(f"quality proxy: {self.proxy.judge_summary} (set-up {self.proxy.setup_seconds:.1f} s)",
                      file=sys.stderr, flush=True)
            trainer.accelerator.wait_for_everyone()
            self.evaluates = True
        else:
            self.evaluates = False
        stage = trainer.stage
        monitor = monitor_settings(stage, cfg.sample_steps)
        self.sampling_steps = len(stage_timesteps(stage, monitor))
        self.guided = monitor.w > 0 and not stage.distill.takes_w  # a student's w costs no second call

    def forces_log(self, step: int) -> bool:
        cfg = self.t.cfg
        return (self.grids and step_due(cfg.sample_every, step)) or (self.evaluates and step_due(cfg.eval_every, step))

    def _decide(self, record: dict[str, Any] | None, last: bool, interrupted: bool) -> tuple[bool, bool]:
        """(grid, proxy) due at this record (main process's view)."""
        cfg, step = self.t.cfg, self.t.step
        grid = proxy = False
        if self.grids and self.grid_step != step:
            if last:
                grid = True
            elif cfg.sample_every == "auto":
                part = grid_part(step, cfg.max_steps, self.clock() - self.started, cfg.max_seconds)
                grid = self.grid_part < part < GRID_PARTS
            else:
                grid = step_due(cfg.sample_every, step)
        if self.evaluates and not interrupted:
            if last:
                proxy = True
            elif cfg.eval_every == "auto" and record is not None:
                proxy = proxy_due(self.train_seconds, self.proxy_seconds, self._estimate(record))
            else:
                proxy = step_due(cfg.eval_every, step)
        return grid, proxy

    def _estimate(self, record: dict[str, Any]) -> float:
        if self.last_proxy is not None:
            return self.last_proxy
        rate = (record.get("img_per_s") or 0.0) / self.t.world_size  # the proxy runs on one process
        return first_proxy_estimate(self.t.cfg.eval_count, self.sampling_steps, self.guided, rate)

    def after_record(self, record: dict[str, Any] | None, *, last: bool, interrupted: bool = False) -> None:
        """At a logging step (``record``: its window record, None when the window is empty), after its checkpoint:
        the grid and proxy due (``last``: the run's final step; ``interrupted``: a stop signal's, no proxy), then
        the record (main process) to metrics.jsonl, the trackers and the progress display."""
        t = self.t
        acc = t.accelerator
        if record is not None:
            self.train_seconds += record["seconds"]
        flags = torch.tensor(self._decide(record, last, interrupted) if acc.is_main_process else (False, False),
                             device=t.device)
        if t.world_size > 1:
            flags = broadcast(flags, from_process=0)
        grid, proxy = (bool(f) for f in flags.tolist())
        extra: dict[str, Any] = {}
        if grid:
            started = self.clock()
            with rng_kept():
                path = t._write_samples()
            self.grid_step = t.step
            self.grid_part = max(self.grid_part, grid_part(t.step, t.cfg.max_steps, self.clock() - self.started,
                                                           t.cfg.max_seconds))
            if path is not None:
                log_image(acc, "samples", path, t.step)
            extra["grid_seconds"] = self.clock() - started
        if proxy:
            if self.proxy is not None:
                started = self.clock()
                with rng_kept():
                    extra.update(self.proxy(t.ema.model, t.diffusion))
                self.last_proxy = self.clock() - started
                self.proxy_seconds += self.last_proxy
                extra["proxy_seconds"] = self.last_proxy  # with the judge's scoring, not only the sampling
            acc.wait_for_everyone()
        if acc.is_main_process:
            if record is not None:
                record = {**record, **extra}
                t.metrics.write(record)
                log_scalars(acc, record)
                self.progress.window(record)
            elif extra:
                log_scalars(acc, {"step": t.step, **extra})

    def finish(self) -> None:
        """The end of a completed run (main process): the run report (`cascade.evaluation.run_report`) unless
        trainer.run_report=false; a failure there is a warning (the run itself is complete)."""
        if not self.t.accelerator.is_main_process or not self.t.cfg.run_report:
            return
        from cascade.evaluation.run_report import write_run_report

        try:
            path = write_run_report(Path(self.t.run_dir))
        except Exception as err:  # noqa: BLE001 - the checkpoints are written; the report is an extra
            warn(f"the run report could not be written: {err}")
            return
        print(f"run report: {path}", file=sys.stderr, flush=True)
