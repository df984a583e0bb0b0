"""Quality benchmark: train named recipes of one stage for the same budget, sample them, score the samples.

    python tools/make_shards.py --source digits --out data/digits --val-fraction 0.2
    python tools/make_shards.py --source patches --out data/patches --max-res 64 --val-fraction 0.2   # harder
    python tools/quality_bench.py --stage base32 --data data/digits --recipes today,eps-simple --minutes 2
    python tools/quality_bench.py --stage base32 --data data/digits --steps 2000 --samplers ddim25,ddpm50:w=1
    python tools/quality_bench.py --stage sr64 --data data/photos --minutes 10 --samplers ddim25:s=0.03
    python tools/quality_bench.py --stage base32 --data data/digits --quick      # a smoke run, well under a minute
    python tools/quality_bench.py --stage base32 --data data/photos --recipes today --minutes 10 --distill 10 \
        --samplers ddpm40,ddim25,ddim10      # + a 4-step student of each recipe: NFE against quality
    python tools/quality_bench.py --stage base32 --data data/photos --recipes today --minutes 10 --distill 10 \
        --distill-method consistency         # consistency students, sampled in 1, 2 and 4 steps

Base stages are judged by a small classifier trained on the real train split (cached in <data>/judge/):
class accuracy, Fréchet distance and KID against the real val split. SR stages are judged teacher-forced
on real low-resolution val inputs: consistency PSNR, PSNR to the real image and detail ratio, beside
bicubic upsampling. Writes <out>/quality.md, <out>/quality.json, one sample grid per recipe and sampler
(one row per class) and the trained runs in <out>/runs/. Bad inputs: one line on stderr, exit code 2.

--distill MINUTES (or --distill-steps N) also distils each recipe's trained stage (the teacher) into a student
(tools/distill_stage.py's defaults; <out>/runs/<recipe>-distilled) by --distill-method: step (the default: DDIM in 4
steps for a base stage, 2 for an SR stage, each step reproducing --distill-teacher-steps / steps guided DDIM steps of
the teacher), consistency (the consistency sampler in 1 to --distill-levels steps) or guidance (w as an input: the
teacher's sampler and steps). It samples each student with --student-samplers (default: the student's own settings,
e.g. ddim4 for a base step student, and for a consistency student also 1 and 2 steps; one network evaluation per step)
beside the teacher's --samplers; the report adds a table of quality against network evaluations per image.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import stages
from cascade.cli import OneLineArgumentParser, report_error
from cascade.errors import cli_main
from cascade.evaluation.cas import CASSettings
from cascade.evaluation.judge import JudgeSettings
from cascade.harness.quality_bench import (
    BenchConfig,
    distill_settings,
    main_settings,
    prepare,
    run_benchmark,
)
from cascade.harness.quality_recipes import DEFAULT_RECIPES, RECIPES, BenchError
from cascade.harness.quality_report import write_report
from cascade.harness.quality_samplers import parse_samplers
from cascade.locks import FolderLock
from cascade.training.trainer_config import DistillSettings

PROG = "quality_bench"
QUICK = {"steps": 3, "per_class": 2, "samplers": "ddim3", "judge_epochs": 2}


def _workers(text: str) -> int | str:
    """--workers: auto or an integer (its range is checked with the other settings)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or an integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, help="the stage to train: base32, sr64, sr128 or sr256")
    p.add_argument("--data", required=True, metavar="DIR", help="shard folder (tools/make_shards.py)")
    p.add_argument("--out", default=None, help="output folder (default quality/<stage>)")
    p.add_argument("--recipes", default=None,
                   help=f"comma-separated recipes (default: {', '.join(DEFAULT_RECIPES)}); "
                        + "; ".join(f"{k}: {v.description}" for k, v in RECIPES.items())
                        + ". Each may be followed by +KEY=VALUE changes: a trainer setting (+lr=1e-3, +batch_size=16, "
                          "+ema_decay=0.995) or a stage setting (+diffusion.min_snr_gamma=1)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None, help="wall-clock training minutes per recipe")
    budget.add_argument("--steps", type=int, default=None, help="training steps per recipe")
    p.add_argument("--samplers", default=None,
                   help="comma-separated SAMPLER STEPS[:w=W][:eta=E][:s=S][:gi=LO-HI], e.g. ddim25,ddpm50:w=1,"
                        "dpmpp2m15:gi=100-800 (gi: guidance only for timesteps LO..HI) (default ddim25)")
    p.add_argument("--w", type=float, default=None,
                   help="default guidance weight of the samplers (default: the stage's own sampling.w)")
    p.add_argument("--per-class", type=int, default=None,
                   help="samples per class (SR: val inputs per class) (default: as many as the val split's "
                        "smallest class holds, so samples and real val images are about as many)")
    p.add_argument("--size", default="tiny", help="stage preset size: tiny or paper (default tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of training, sampling and the judge (default 0)")
    p.add_argument("--workers", type=_workers, default="auto",
                   help="data loader processes while training, or auto (default: data.num_workers=auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice); 1 avoids OpenMP oversubscription when "
                        "other processes share the cores")
    p.add_argument("--sample-batch", type=int, default=100, help="images per sampling batch (default 100)")
    p.add_argument("--judge-epochs", type=int, default=None, help=f"judge training epochs (default {JudgeSettings.epochs})")
    p.add_argument("--cas", action="store_true",
                   help="also the Classification Accuracy Score per row (a small CNN trained on the samples, tested "
                        "on real val images, beside the same CNN trained on as many real images)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace runs (and distillations) of the same recipes already in --out")
    p.add_argument("--reuse", action="store_true",
                   help="sample and score runs already trained in --out with the same recipe and budget instead of "
                        "training them again (e.g. to try more --samplers), and their distillations with the same "
                        "distillation budget and settings")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['steps']} steps, {QUICK['per_class']} samples per class, "
                        f"{QUICK['samplers']}, {QUICK['judge_epochs']} judge epochs (explicit options win)")
    p.add_argument("--progress", action="store_true", help="training progress bars")
    distill = p.add_mutually_exclusive_group()
    distill.add_argument("--distill", type=float, default=None, metavar="MINUTES",
                         help="also distil each recipe's trained stage into a student (--distill-method) for this "
                              "many wall-clock minutes (same data and seed, common trainer settings) and sample it "
                              "with --student-samplers")
    distill.add_argument("--distill-steps", type=int, default=None, metavar="N",
                         help="the same, for N distillation steps")
    p.add_argument("--student-samplers", default=None, metavar="LIST",
                   help="the students' settings, as --samplers (default: each student's own: ddim4 for a base step "
                        "student, ddim2 for an SR one; consistency students their own steps and 1 and 2; guidance "
                        "students the teacher's sampler; w at most --distill-w-max; needs --distill or "
                        "--distill-steps)")
    p.add_argument("--distill-method", default=None, choices=("step", "consistency", "guidance"),
                   help=f"how the students learn (default {DistillSettings.method}): step (DDIM in 4 steps for a base "
                        "stage, 2 for an SR stage, each reproducing several guided DDIM steps of the teacher), "
                        "consistency (the consistency sampler in 1 to --distill-levels steps) or guidance (w as an "
                        "input only: the teacher's sampler and steps at half the network evaluations)")
    p.add_argument("--distill-teacher-steps", type=int, default=None, metavar="N",
                   help="step only: the teacher's guided DDIM steps that the student's steps reproduce together, a "
                        "multiple of the student's steps larger than them (default four times the student's steps)")
    p.add_argument("--distill-levels", type=int, default=None, metavar="N",
                   help=f"consistency only: the grid's levels N (2 to 1000; default {DistillSettings.levels}): a "
                        "student samples in 1 to N steps")
    p.add_argument("--distill-w-max", type=float, default=None,
                   metavar="W",
                   help=f"the students learn every guidance weight w in [0, W] (default {DistillSettings.w_max:g})")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    quick = QUICK if args.quick else {}
    minutes, steps = args.minutes, args.steps
    if minutes is None and steps is None:
        steps = quick.get("steps")
    default_w = args.w  # None: each stage's own sampling.w
    recipes, samplers = main_settings(args.recipes, args.samplers or quick.get("samplers", "ddim25"), default_w)
    distilling = args.distill is not None or args.distill_steps is not None
    if not distilling:
        given = [o for o, v in (("--student-samplers", args.student_samplers), ("--distill-method", args.distill_method),
                                ("--distill-teacher-steps", args.distill_teacher_steps),
                                ("--distill-levels", args.distill_levels), ("--distill-w-max", args.distill_w_max))
                 if v is not None]
        if given:
            raise BenchError(f"{given[0]} applies to distilled students: add --distill MINUTES or --distill-steps N")
    distill = distill_settings(args.distill_levels, args.distill_w_max, args.distill_method,
                               args.distill_teacher_steps)
    student_samplers = (parse_samplers(args.student_samplers, default_w, option="--student-samplers")
                        if args.student_samplers is not None else [])  # none: each student's own settings
    epochs = args.judge_epochs if args.judge_epochs is not None else quick.get("judge_epochs", JudgeSettings.epochs)
    try:
        judge = JudgeSettings(epochs=epochs, seed=args.seed)
    except ValueError as err:
        raise BenchError(f"--judge-epochs: {err}") from None
    return BenchConfig(
        stage=args.stage, data=Path(args.data), out=Path(args.out or Path("quality") / args.stage), recipes=recipes,
        samplers=samplers, minutes=minutes, steps=steps,
        per_class=args.per_class if args.per_class is not None else quick.get("per_class"), size=args.size,
        seed=args.seed, num_workers=args.workers, sample_batch=args.sample_batch, judge=judge,
        cas=CASSettings() if args.cas else None, overwrite=args.overwrite, reuse=args.reuse, progress=args.progress,
        distill_minutes=args.distill, distill_steps=args.distill_steps, distill=distill,
        student_samplers=student_samplers, default_w=default_w)


@cli_main(PROG, interrupted="interrupted; run the same command to start again")
def main(argv: list[str] | None = None) -> int:
    """0 when the report is written; bad input one line and 2; another failure one line and 1; Ctrl-C 130."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except BenchError as err:
        return report_error(PROG, err)
    with FolderLock(config.out, "--out"):  # one benchmark per --out: a second is refused before it writes
        try:
            presets = {name: functools.partial(stages.get_stage, name) for name in stages.STAGE_NAMES}
            prepared = prepare(config, presets)
            if args.threads is not None:
                if args.threads < 1:
                    raise BenchError(f"--threads must be >= 1, got {args.threads}")
                import torch

                torch.set_num_threads(args.threads)
            result = run_benchmark(prepared, log=lambda m: print(f"[{PROG}] {m}", file=sys.stderr, flush=True))
        except BenchError as err:
            return report_error(PROG, err)
        md, js = write_report(result, prepared.config.out)
    print(md.read_text())
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
