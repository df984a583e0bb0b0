"""Evaluate a cascade stage by stage: FID / KID (/ IS), precision / recall, consistency, detail ratio and class
accuracy, teacher-forced and cascaded; optionally CAS, memorisation and a bootstrap interval for FID.

    python tools/eval_fid.py --data data/shards --stages base32,sr64 --num-samples 1000 --w 3 --steps 100
    python tools/eval_fid.py --data data/shards --cas 50 --memorisation --bootstrap 200
    python tools/eval_fid.py --data data/shards --patch-fid --baselines --sampler sr64=ddim --steps sr64=25
    python tools/eval_fid.py --data data/shards --inception-weights weights/pt_inception-2015-12-05-6726825d.pth
    accelerate launch --multi_gpu --num_processes 2 tools/eval_fid.py --data data/shards --out eval/two

Writes <out>/results.json and <out>/results.md (a compact table per stage, then the full table: rows =
stages, columns = metric × mode, feature-based metrics labelled with their feature network), <out>/results.png
(detail ratio vs consistency per SR stage) and with --memorisation <out>/memorisation-<stage>.png (closest
pairs). Every FID carries its sample count; below 2,048 samples it is marked biased (read KID first).
Real-image statistics are cached in --stats-dir (default <data>/fid_stats/, or <out>/fid_stats/ when the
data folder is read-only; chosen before any sampling).
With `accelerate launch` every process samples its share and the main process computes and writes the
metrics (the same numbers as one process; on CPU too, with `--device cpu`: keep `--multi_gpu`, accelerate's
`--cpu` flag starts a single process). Bad inputs (an unwritable --out, a damaged checkpoint, shards without
a val split) give one line on stderr and exit code 2; other failures one line and 1; Ctrl-C 130, leaving
earlier results untouched. CASCADE_DEBUG=1 shows tracebacks.
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
    parse_choices,
    report_error,
    sampler_overrides,
    show_progress,
    statistics_folder,
)
from cascade.errors import cli_main, deferred_interrupts, ensure_writable_dir
from cascade.evaluation.evaluate import evaluate
from cascade.evaluation.inputs import summary_rows
from cascade.evaluation.sample_lists import MODES
from cascade.locks import FolderLock
from cascade.pipeline.cascade_pipeline import DEFAULT_CHAIN, CascadeConfigError
from cascade.summary import print_summary

PROG = "eval_fid"


def note(message: str) -> None:
    """One line on stderr: what the run chose for the user (e.g. the judge standing in for classifier32)."""
    print(f"{PROG}: note: {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluation_arguments(p, default_stages=",".join(DEFAULT_CHAIN))
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)} (default both)")
    add_sampler_arguments(p)
    add_metric_arguments(p)
    p.add_argument("--baselines", action="store_true",
                   help="add a row per SR stage scoring its real input upsampled (bicubic): what the stage must beat")
    p.add_argument("--out", default="eval", help="output folder (default eval/)")
    return p


@cli_main(PROG, interrupted="interrupted; nothing was written (earlier results in --out are untouched)")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    accelerator = Accelerator(cpu=args.device == "cpu")
    if accelerator.is_main_process:
        ensure_writable_dir(args.out, "--out")
    # One run per --out, whose one writer is the main process: a second run is refused before it starts.
    with FolderLock(args.out, "--out", enabled=accelerator.is_main_process):
        return run_evaluate(args, accelerator)


def run_evaluate(args: argparse.Namespace, accelerator: Accelerator) -> int:
    """The run of ``args`` (the caller holds the --out lock); returns the exit code."""
    try:
        modes = parse_choices(args.modes, MODES, "--modes", what="mode")
        overrides = sampler_overrides(args)
        stats_dir = statistics_folder(args, PROG, accelerator.is_main_process)  # checked before any sampling
        metrics = dataclasses.replace(metric_settings(args), stats_dir=str(stats_dir))
        pipe, feature_nets, classifier = load_evaluation_inputs(args, accelerator.device,
                                                                log=note if accelerator.is_main_process else None)
        extra = [("modes", ", ".join(modes)), ("seed", args.seed), ("batch size", args.batch_size),
                 ("processes", accelerator.num_processes)]

        def summary(settings, num_samples: int) -> None:  # every input checked, nothing sampled yet
            samples = num_samples if args.num_samples else f"{num_samples} (one per val image)"
            print_summary(PROG, summary_rows(pipe, feature_nets, classifier, settings, data_root=args.data,
                                             samples=samples, out=args.out, extra=extra))

        evaluation = evaluate(pipe, args.data, feature_nets=feature_nets, classifier=classifier,
                              settings=pipe.settings(**overrides), metrics=metrics, num_samples=args.num_samples,
                              modes=modes, seed=args.seed, batch_size=args.batch_size, accelerator=accelerator,
                              progress=accelerator.is_main_process and show_progress(), on_start=summary)
    except CascadeConfigError as err:
        return report_error(PROG, err) if accelerator.is_main_process else 2
    if evaluation is None:  # not the main process
        return 0
    with deferred_interrupts():  # a Ctrl-C while writing waits for both files to be complete
        json_path, md_path = evaluation.write(args.out)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
