"""Sample classes through the cascade: base32 → sr64 → sr128 → sr256.

    python tools/sample_cascade.py --classes 1,7 --w 3.0      # guides base32; the SR stages keep their own w
    python tools/sample_cascade.py --classes 1,7 --w base32=3,sr64=1 --steps 50 --stages base32,sr64
    python tools/sample_cascade.py --classes 3 --truncate --aug-level sr64=0.2 --ckpt sr64=runs/sr64-b
    python tools/sample_cascade.py --classes 1,7 --w 1 --guide auto --guide-ckpt base32=runs/base32-guide

Every sampling setting left out is the stage's own default, stored in its checkpoint (`SamplingSettings`), so
`--classes 1,7` alone samples each stage as it samples best. A bare `--w W` guides the chain's first stage (the
base stage) only: the other stages keep their own w unless named (`--w base32=3,sr64=2`). The other bare sampler
options apply to every stage they fit: `--steps` and `--sampler` to all, `--eta` to the DDIM stages, `--aug-level`
and `--truncate` to the SR stages, `--guide auto` (autoguidance: (1+w)·model − w·guide) to the stages given a
`--guide-ckpt STAGE=PATH` (a weaker checkpoint of that stage, e.g. an earlier one of its run). Before sampling, a summary on stderr names the device, precision, classes, seed
and --out and, per stage, its checkpoint and step and the settings it samples with, a value from the command
line marked with its option (`w=3 (--w)`), and its network evaluations per image (NFE). Writes to --out: `<class>-<name>_<index>.png`
(final stage; `<class>_<index>.png` where the classes have no names), `<stage>/<class>-<name>_<index>.png`
(every stage), `grid.png` (rows = samples by class, columns = stages), `.outputs.json` (the files written) and
`settings.json`, last: a folder without settings.json is incomplete (an interrupted run removes the old one
first). A run owns its --out: it replaces the outputs of an earlier sampling run there (listed in
.outputs.json), refuses a folder holding other files unless --overwrite, and a second run into the same --out
while one is running is refused (the lock file .cascade.lock names the owner). Bad inputs (an unwritable or
busy --out, a damaged checkpoint) give one line on stderr and exit code 2; other failures one line and 1;
Ctrl-C 130. CASCADE_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import argparse
import sys

import stages
from cascade.cli import (
    SAMPLER_OPTIONS,
    OneLineArgumentParser,
    add_sampler_arguments,
    default_device,
    int_at_least,
    parse_ckpt_pairs,
    parse_classes,
    parse_stage_list,
    report_error,
    sampler_overrides,
    show_progress,
)
from cascade.errors import cli_main, deferred_interrupts, ensure_writable_dir, plural
from cascade.locks import FolderLock
from cascade.pipeline.cascade_pipeline import DEFAULT_CHAIN, PRECISIONS, CascadeConfigError, CascadePipeline
from cascade.pipeline.outputs import check_out_dir, write_outputs
from cascade.pipeline.stage_sampling import default_chunk
from cascade.summary import print_summary

PROG = "sample_cascade"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", required=True, help="comma-separated class indices, e.g. 1,7")
    p.add_argument("--num-per-class", type=int_at_least(1), default=1, help="images per class (default 1)")
    p.add_argument("--stages", default=",".join(DEFAULT_CHAIN), help="the chain, e.g. base32,sr64 (default: all)")
    p.add_argument("--runs", default="runs", help="runs folder holding <stage>/ run dirs (default runs)")
    p.add_argument("--ckpt", action="append", default=[], metavar="STAGE=PATH",
                   help="checkpoint of one stage (run dir, checkpoints dir or step dir); repeatable")
    add_sampler_arguments(p, w_first_stage=True)
    p.add_argument("--classifier", default=None, metavar="PATH", help="classifier checkpoint for the base stage")
    p.add_argument("--classifier-scale", type=float, default=0.0,
                   help="classifier guidance scale (default 0; needs --classifier)")
    p.add_argument("--batch-size", type=int_at_least(1), default=None, help="samples per batch (default: on CPU each stage's fastest, "
                                                                             "16 at 32² to 2 at 256²; on GPU all at "
                                                                             "once)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="same seed, same images (default 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--precision", default="auto",
                   help=f"one of {', '.join(PRECISIONS)} (default auto: bf16 where the device computes it natively, "
                        "else fp32)")
    p.add_argument("--out", default="samples", help="output folder (default samples/); an earlier sampling run's "
                                                    "outputs there are replaced")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --out that holds files no sampling run wrote (same-named files are replaced)")
    return p


@cli_main(PROG, interrupted="interrupted; the output folder is incomplete (no settings.json); run the same "
                            "command to write it")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ensure_writable_dir(args.out, "--out")
    with FolderLock(args.out, "--out"):  # one run per --out: a second one is refused before it writes anything
        return sample(args)


def sample(args: argparse.Namespace) -> int:
    """Sample per ``args`` into args.out (whose lock the caller holds); returns the exit code."""
    try:
        chain = parse_stage_list(args.stages, stages.STAGE_NAMES)
        pipe = CascadePipeline.from_runs(args.runs, chain, checkpoints=parse_ckpt_pairs(args.ckpt),
                                         device=args.device or default_device(), precision=args.precision)
        overrides = sampler_overrides(args, bare_w_stage=chain[0])
        if args.classifier is not None:
            overrides.update(classifier=args.classifier, classifier_scale=args.classifier_scale)
        elif args.classifier_scale:
            overrides["classifier_scale"] = args.classifier_scale
        plan = pipe.validate(parse_classes(args.classes), pipe.settings(**overrides),
                             num_per_class=args.num_per_class, batch_size=args.batch_size, seed=args.seed)
    except CascadeConfigError as err:
        return report_error(PROG, err)
    check_out_dir(args.out, overwrite=args.overwrite)  # refused before sampling; earlier outputs go when new ones are written
    print_summary(PROG, summary_rows(args, pipe, plan, overrides))
    outputs = pipe.run(plan, progress=show_progress())
    with deferred_interrupts():  # a Ctrl-C while writing waits for the files to be complete
        written = write_outputs(outputs, plan, args.out, record=pipe.run_record(plan), class_names=pipe.class_names)
    final = plan.stages[-1]
    print(f"wrote {plural(written.final_images, 'image')} of {final.resolution}x{final.resolution} and the stages "
          f"{', '.join(s.name for s in plan.stages)} to {written.folder}/ (grid.png, settings.json)")
    return 0


def chunk_sizes(pipe: CascadePipeline) -> str:
    """The default batch size of each stage (`default_chunk`), e.g. "16 (base32), 16 (sr64)", or "all at once"."""
    sizes = [(default_chunk(s.config.resolution, pipe.device), s.config.name) for s in pipe.stages]
    if all(size is None for size, _ in sizes):
        return "all at once"
    return ", ".join(f"{size} ({name})" for size, name in sizes)


def summary_rows(args: argparse.Namespace, pipe: CascadePipeline, plan, overrides: dict) -> list[tuple[str, object]]:
    """The start-up summary: where and how it samples, then one row per stage (`CascadePipeline.describe`)."""
    count = len(plan.classes) * plan.num_per_class
    return [("device", pipe.device), ("precision", pipe.precision),
            ("classes", f"{','.join(map(str, plan.classes))} × {plan.num_per_class} = {plural(count, 'image')}"),
            ("seed", plan.seed), ("batch size", plan.batch_size or chunk_sizes(pipe)), ("out", args.out),
            ("settings", "(--option) marks a value from the command line; unmarked: the checkpoint's default"),
            *pipe.describe(plan, overrides, labels=SAMPLER_OPTIONS)]


if __name__ == "__main__":
    sys.exit(main())
