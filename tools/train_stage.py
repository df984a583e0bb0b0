"""Train one stage of the cascade (a hydra app; configuration in configs/train.yaml).

    python tools/train_stage.py stage=sr64 size=tiny data.root=data/shards trainer.max_steps=1000
    torchrun --nproc_per_node 2 tools/train_stage.py stage=base32 data.root=data/shards
    accelerate launch --multi_gpu --num_processes 2 tools/train_stage.py stage=base32 data.root=data/shards
    python tools/train_stage.py stage=sr64 data.root=data/shards --cfg job --resolve   # print the config

Several processes train data-parallel on GPUs, or on CPU with gloo (torchrun, or accelerate launch
--multi_gpu: accelerate's --cpu launches a single process).

Watching it (docs/watching.md): the trainer prints a start-up summary on stderr (stage, parameters, device,
precision, data, batch, steps, output folders, cadences), then a progress bar on a terminal or one plain line
per logging window in a log file; metrics go to <run_dir>/metrics.jsonl, sample grids to <run_dir>/samples/.
trainer.report_to=tensorboard (or wandb, or tensorboard,wandb; pip install -e ".[track]") also feeds a tracker:

    python tools/train_stage.py stage=base32 data.root=data/shards trainer.report_to=tensorboard
    tensorboard --logdir runs/base32

Resumes from the newest readable checkpoint in run_dir (default runs/<stage>) unless resume=never or a
path; prints the final checkpoint's folder. Configuration errors (hydra's own included: unknown keys or
options, override syntax, interpolations) print one line on stderr and exit with 2; a failure during the
run prints one line and exits with 1; Ctrl-C writes a checkpoint at the current step, prints
"interrupted at step N; run the same command to resume" and exits with 130; so do SIGTERM (preemption by Slurm,
Kubernetes, `docker stop`, `timeout`: "interrupted by SIGTERM at step N; ...", exit 143) and SIGUSR1 (Slurm's
`--signal` warning, 138), on every rank of a torchrun / accelerate launch run. HYDRA_FULL_ERROR=1 (or
CASCADE_DEBUG=1) shows tracebacks.

The command line's edge (checks before hydra runs, one-line errors, exit codes) is `cascade.harness.hydra_tool`,
shared with tools/distill_stage.py.
"""

from __future__ import annotations

from cascade.harness import hydra_tool
from cascade.harness.hydra_tool import HydraTool, build_run, shard_classes, tool_main
from stages.hydra_store import register

register()

TOOL = HydraTool(prog="train_stage", config_name="train", build=lambda cfg: build_run(cfg, shard_classes))


def check_command_line(argv: list[str]) -> None:
    """`cascade.harness.hydra_tool.check_command_line` for this tool: exit 2 with one line on a bad command line."""
    hydra_tool.check_command_line(argv, TOOL)


if __name__ == "__main__":
    tool_main(TOOL)
