"""Distil a trained stage into a few-step student (a hydra app; configuration in configs/distill.yaml).

    python tools/distill_stage.py stage=base32 teacher=runs/base32 data.root=data/shards trainer.max_seconds=600
    python tools/distill_stage.py stage=sr64 teacher=runs/sr64 data.root=data/shards distill.steps=2
    python tools/distill_stage.py stage=base32 teacher=runs/base32 data.root=data/shards distill.method=guidance

The student is the teacher's stage with the guidance weight w as a network input, trained from the teacher's EMA
weights on the same shards (docs/distillation.md): distill.method=step (the default: DDIM in distill.steps steps,
4 for a base stage and 2 for an SR stage, each reproducing distill.teacher_steps / distill.steps guided DDIM steps
of the teacher), consistency (guided consistency distillation, the consistency sampler in 1 to distill.levels
steps) or guidance (w as an input only: the teacher's sampler at half the evaluations). Its checkpoints (run_dir,
default runs/<stage>-distilled) are ordinary stage checkpoints whose sampling defaults are the student's sampler,
so `sample_cascade.py --ckpt base32=runs/base32-distilled` and `eval_fid.py` use them as they are.

Everything else is tools/train_stage.py's: trainer.* settings and a time budget (trainer.max_seconds), the start-up
summary and progress lines, resume from the newest readable checkpoint in run_dir, one-line errors (exit 2 for a
bad configuration: a teacher of another stage or resolution, stage.* overrides), Ctrl-C / SIGTERM / SIGUSR1 write a
checkpoint at the current step and exit with 128 + the signal.
"""

from __future__ import annotations

from cascade.harness import hydra_tool
from cascade.harness.hydra_tool import HydraTool, build_distill_run, tool_main
from stages.hydra_store import preset_node, register

register()

TOOL = HydraTool(prog="distill_stage", config_name="distill", build=lambda cfg: build_distill_run(cfg, preset_node))


def check_command_line(argv: list[str]) -> None:
    """`cascade.harness.hydra_tool.check_command_line` for this tool: exit 2 with one line on a bad command line."""
    hydra_tool.check_command_line(argv, TOOL)


if __name__ == "__main__":
    tool_main(TOOL)
