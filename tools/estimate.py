"""Estimate a training run's time on this machine: the stage's training step timed, and what it implies.

    python tools/estimate.py stage=base32 size=tiny trainer.batch_size=16
    python tools/estimate.py stage=sr64 trainer.max_steps=20000 --steps 5
    python tools/estimate.py stage=base32 size=paper --device cuda
    python tools/estimate.py --all            # every tiny preset, then the paper base32

Takes the overrides of tools/train_stage.py (KEY=VALUE, composed from configs/ with hydra's compose API; no
data.root: nothing is read) and times the trainer's own optimizer step (model, loss, AdamW, EMA update:
`cascade.training.step.TrainStep`) on synthetic batches of the stage's shapes, --steps steps after one warm-up,
in the precision and memory layout a training run would choose here. Prints per stage: parameters, FLOPs per
image, device, precision, layout, batch, img/s, s/step, seconds per 1,000 steps, the time of the configured
trainer.max_steps and days per million images. The class count is the preset's (stage.num_classes=N to change);
the data loader is not timed. A paper preset on a CPU is timed at batch --max-batch (default 2) and scaled
linearly to its batch, as the output says. --all is a quick survey: one timed step per stage, the paper base32
on a CPU at batch 1, and on a CPU the contiguous layout (a single stage's estimate measures the layouts as
trainer.channels_last=auto does). A run stops at trainer.max_steps, or earlier at a time budget:
trainer.max_seconds=SECONDS ends it with its final checkpoint after that many seconds of training.

Where tools/gpu_check.sh has recorded GPU figures (its gpu_check.json, by default under /tmp/gpu_check_out/;
--gpu-check PATH to choose), the tiny stages' GPU training throughput is printed beside. Never downloads anything.
A bad override or option prints one line on stderr and exits with 2; CASCADE_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import argparse
import sys

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import stages
from cascade.cli import OneLineArgumentParser, default_device, int_at_least
from cascade.config import StageConfig
from cascade.errors import cli_main
from cascade.harness.hydra_tool import (  # train_stage.py's composition and error wording
    CONFIG_DIR,
    error_line,
)
from cascade.summary import print_summary
from cascade.training.trainer_config import TrainerConfig
from stages.hydra_store import register

register()

CONFIG_NAME = "train"  # tools/train_stage.py's primary config

PROG = "estimate"
GPU_CHECK_JSON = "/tmp/gpu_check_out/gpu_check.json"  # tools/gpu_check.sh's default $OUT/gpu_check.json
PAPER_CPU_BATCH = 2  # images per timed step of a paper preset on a CPU (its full batch would take minutes)
STEPS, SCALED_STEPS = 3, 1  # timed steps per stage: at the configured batch, and at a smaller one (scaled)
# --all, a quick survey: one timed step per stage, the paper base32 at batch 1 on a CPU, no layout probe
ALL_STEPS, ALL_PAPER_CPU_BATCH = 1, 1
ALL = [*(("tiny", name) for name in stages.STAGE_NAMES), ("paper", "base32")]


class EstimateUsageError(ValueError):
    """A command line this tool cannot use; the message is one line."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides as for tools/train_stage.py, e.g. stage=sr64 size=tiny trainer.batch_size=16")
    p.add_argument("--steps", type=int_at_least(1), default=None,
                   help=f"timed steps per stage after one warm-up (default {STEPS}; {SCALED_STEPS} where the step is "
                        "timed at a smaller batch and scaled)")
    p.add_argument("--all", action="store_true",
                   help="every tiny preset and the paper base32 (the overrides apply to each; no stage= or size=)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--max-batch", type=int_at_least(1), default=None,
                   help=f"time at most this many images per step and scale linearly (default: all; a paper preset "
                        f"on a CPU: {PAPER_CPU_BATCH})")
    p.add_argument("--gpu-check", default=GPU_CHECK_JSON, metavar="PATH",
                   help=f"gpu_check.json of tools/gpu_check.sh, shown beside (default {GPU_CHECK_JSON}, if present)")
    return p


def compose_run(overrides: list[str]) -> tuple[StageConfig, str, TrainerConfig]:
    """(stage, size, trainer settings) composed as tools/train_stage.py composes them; the stage's class count, when
    not set, is the preset's. Raises EstimateUsageError (one line) for a bad override or value."""
    parsed = []
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None, job_name=PROG):
            cfg = compose(CONFIG_NAME, overrides=overrides)
        c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        size, stage = str(c["size"]), dict(c["stage"])
        if OmegaConf.is_missing(cfg.stage, "num_classes"):
            stage["num_classes"] = stages.get_stage(stage["name"], size).num_classes
        return StageConfig.from_dict(stage), size, TrainerConfig(**c["trainer"])
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise EstimateUsageError(error_line(err, parsed, "train_stage")) from None


@cli_main(PROG, bad_input=(EstimateUsageError,))
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    import torch

    from cascade.harness.estimate import estimate_rows, estimate_training, gpu_check_figures

    device = args.device or default_device()
    try:

        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise EstimateUsageError(f"--device {device}: no CUDA device on this machine; use cpu")
    except RuntimeError:
        raise EstimateUsageError(f"--device {device!r} is not a torch device; use e.g. cpu or cuda") from None
    if args.all:
        chosen = [o for o in args.overrides if o.lstrip("+~").split("=")[0] in ("stage", "size")]
        if chosen:
            raise EstimateUsageError(f"--all chooses the stages and sizes itself; drop {' '.join(chosen)}")
        runs = [[*args.overrides, f"stage={name}", f"size={size}"] for size, name in ALL]
    else:
        runs = [args.overrides]
    composed = [compose_run(overrides) for overrides in runs]  # every override checked before any timing
    try:
        gpu = gpu_check_figures(args.gpu_check)
    except ValueError as err:
        raise EstimateUsageError(str(err)) from None
    on_cpu = torch.device(device).type == "cpu"
    for stage, size, trainer in composed:
        max_batch = args.max_batch
        if max_batch is None and size == "paper" and on_cpu:
            max_batch = ALL_PAPER_CPU_BATCH if args.all else PAPER_CPU_BATCH
        scaled = max_batch is not None and max_batch < trainer.batch_size * trainer.grad_accum
        # a scaled (large) model or --all: no layout probe (it costs about 8 forward + backward passes)
        steps = args.steps or (ALL_STEPS if args.all else SCALED_STEPS if scaled else STEPS)
        est = estimate_training(stage, trainer, size=size, device=device, max_batch=max_batch, steps=steps,
                                layout_probe=not (scaled or args.all))
        print_summary(f"{stage.name} ({size})", estimate_rows(est, gpu.get(stage.name) if size == "tiny" else None),
                      file=sys.stdout)
    if not gpu:
        print(f"GPU figures: none recorded (tools/gpu_check.sh on a GPU machine writes them to {args.gpu_check})")
    print("A time budget: trainer.max_seconds=SECONDS stops a run after that many seconds of training, with its "
          "final checkpoint (0: no limit).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
