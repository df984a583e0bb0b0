"""Sweep guidance weights w and augmentation levels s per stage; metrics per setting, the best one marked.

    python tools/sweep.py --data data/shards --stages base32,sr64 --w 0,1,3 --aug-level 0,0.1,0.3 --steps 100
    python tools/sweep.py --data data/shards --w base32=0,2,4,sr64=0,1 --mode cascaded
    python tools/sweep.py --data data/shards --w 0,1,3 --cas 20 --rank-metric cas_top1
    accelerate launch tools/sweep.py --data data/shards --inception-weights weights/pt_inception-2015-12-05-6726825d.pth

The base stage tries every w; SR stages every (w, s), teacher-forced by default (each stage judged alone on
real low-resolution inputs) or cascaded (each SR stage takes the previous stage's samples at its best
setting). Writes <out>/sweep.json, <out>/sweep.md and <out>/sweep.png and prints the best settings as
flags for tools/sample_cascade.py. The best is the lowest FID unless --rank-metric names another metric
(kid_mean, precision, recall, class_accuracy, consistency_psnr, detail_ratio (closest to 1), cas_top1, ...);
feature metrics come from the standard Inception when --inception-weights is given, else from the
classifier's features (--rank-by NAME to choose). Bad inputs (an unwritable --out, a damaged checkpoint):
one line, exit code 2; other failures one line and 1; Ctrl-C 130, leaving earlier results untouched.
CASCADE_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from accelerate import Accelerator

from cascade.cli import (
    OneLineArgumentParser,
    add_evaluation_arguments,
    add_metric_arguments,
    add_sampler_arguments,
    load_evaluation_inputs,
    metric_settings,
    report_error,
    sampler_overrides,
    show_progress,
    statistics_folder,
)
from cascade.errors import cli_main, deferred_interrupts, ensure_writable_dir
from cascade.evaluation.inputs import summary_rows
from cascade.evaluation.metrics import METRIC_GOALS
from cascade.evaluation.sample_lists import MODES, TEACHER_FORCED
from cascade.evaluation.sweep import sweep
from cascade.locks import FolderLock
from cascade.pipeline.cascade_pipeline import CascadeConfigError
from cascade.summary import print_summary

PROG = "sweep"


def note(message: str) -> None:
    """One line on stderr: what the run chose for the user (e.g. the judge standing in for classifier32)."""
    print(f"{PROG}: note: {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluation_arguments(p, default_stages="base32,sr64")
    p.add_argument("--mode", default=TEACHER_FORCED, choices=MODES, help=f"default {TEACHER_FORCED}")
    p.add_argument("--rank-by", default=None, metavar="NAME",
                   help="feature network of the feature metrics (FID, KID, precision, recall) that rank "
                        "(default: inception-v3 if given, else the classifier's features)")
    p.add_argument("--rank-metric", default="fid", choices=list(METRIC_GOALS),
                   help="the metric that picks the best setting (default fid; lowest FID / KID, highest precision, "
                        "recall, accuracies and consistency, detail ratio closest to 1)")
    add_sampler_arguments(p, grid=True)
    add_metric_arguments(p, memorisation=False)
    p.add_argument("--out", default="sweep", help="output folder (default sweep/)")
    return p


@cli_main(PROG, interrupted="interrupted; nothing was written (earlier results in --out are untouched)")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    accelerator = Accelerator(cpu=args.device == "cpu")
    if accelerator.is_main_process:
        ensure_writable_dir(args.out, "--out")
    # One run per --out, whose one writer is the main process: a second run is refused before it starts.
    with FolderLock(args.out, "--out", enabled=accelerator.is_main_process):
        return run_sweep(args, accelerator)


def run_sweep(args: argparse.Namespace, accelerator: Accelerator) -> int:
    """The run of ``args`` (the caller holds the --out lock); returns the exit code."""
    try:
        grid = sampler_overrides(args, grid=True)
        stats_dir = statistics_folder(args, PROG, accelerator.is_main_process)  # checked before any sampling
        metrics = dataclasses.replace(metric_settings(args), stats_dir=str(stats_dir))
        w, aug_level = grid.pop("w", None), grid.pop("aug_level", None)
        pipe, feature_nets, classifier = load_evaluation_inputs(args, accelerator.device,
                                                                log=note if accelerator.is_main_process else None)
        extra = [("w tried", args.w), ("s tried", args.aug_level or "each stage's own"), ("mode", args.mode),
                 ("rank metric", args.rank_metric), ("seed", args.seed), ("batch size", args.batch_size),
                 ("processes", accelerator.num_processes)]

        def summary(settings, num_samples: int) -> None:  # every input checked, nothing sampled yet
            samples = num_samples if args.num_samples else f"{num_samples} (one per val image)"
            print_summary(PROG, summary_rows(pipe, feature_nets, classifier, settings, data_root=args.data,
                                             samples=samples, out=args.out, extra=extra))

        result = sweep(pipe, args.data, feature_nets=feature_nets, classifier=classifier,
                       settings=pipe.settings(**grid), w=w, aug_level=aug_level, mode=args.mode,
                       rank_by=args.rank_by, rank_metric=args.rank_metric, num_samples=args.num_samples, seed=args.seed,
                       batch_size=args.batch_size, accelerator=accelerator,
                       progress=accelerator.is_main_process and show_progress(),
                       metrics=metrics, on_start=summary)
    except CascadeConfigError as err:
        return report_error(PROG, err) if accelerator.is_main_process else 2
    if result is None:  # not the main process
        return 0
    with deferred_interrupts():  # a Ctrl-C while writing waits for the files to be complete
        paths = result.write(args.out)
    print(paths[1].read_text())
    print(f"wrote {', '.join(str(p) for p in paths)}")
    print(f"best settings: {result.flags()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
