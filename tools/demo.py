"""The whole system on a laptop CPU: shards → train 5 stages → sample the cascade → evaluate → report.

    python tools/demo.py                 # ~17 minutes on 2 CPU cores (training by the clock); resumable
    python tools/demo.py --quick         # ~2-minute smoke version
    python tools/demo.py --distill       # also distil base32 and sr64 into few-step students (same training minutes)
    python tools/demo.py --out DIR       # default demo_out/ (--quick: demo_out_quick/; --distill adds _distilled)

--distill: base32 and sr64 each give 60 s of their training seconds to a distilled few-step student (4 and 2
sampling steps; --quick: a few distillation steps each). Teacher and student of each are scored on the same
teacher-forced samples by the stage's headline metric (base32: KID in whole-image features; sr64: the detail
ratio at >= 30 dB consistency) and the cascade samples with the better one; the report shows both and which was
used. Off by default: at the demo's budget it costs the teachers training time and buys back little sampling time
(measured: docs/results/2026-12-06.md).

Prints where the report (HTML + Markdown) is. One demo per --out: a second one while the first runs is refused
with one line (exit code 2).
"""

from __future__ import annotations

import argparse
import sys

from cascade.cli import OneLineArgumentParser
from cascade.errors import cli_main

DISTILL_BY_DEFAULT = False  # what the demo does without --distill / --no-distill


@cli_main("demo", interrupted="interrupted; run the same command to resume")
def main(argv: list[str] | None = None) -> int:
    """0 when the report is written; bad input (a flag, a second demo on --out) one line and 2; another failure
    one line and 1; Ctrl-C one line and 130."""
    parser = OneLineArgumentParser(prog="demo", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2-minute smoke version (tiny data, few steps)")
    parser.add_argument("--out", default=None,
                        help=("output folder (default demo_out/ or demo_out_quick/; with distillation "
                              "demo_out_distilled/ or demo_out_quick_distilled/)"))
    parser.add_argument("--distill", action=argparse.BooleanOptionalAction, default=DISTILL_BY_DEFAULT,
                        help=("distil base32 and sr64 into few-step students within the same training minutes and "
                              "sample each stage with whichever of teacher and student scores better (default: "
                              f"{'on' if DISTILL_BY_DEFAULT else 'off'})"))
    parser.add_argument("--seed", type=int, default=0, help="seed for data, training and sampling (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")

    import stages
    from cascade.harness.demo import TRAIN_ORDER, demo_budget, run_demo
    from cascade.locks import FolderLock, FolderLocked

    out = args.out or ("demo_out_quick" if args.quick else "demo_out") + ("_distilled" if args.distill else "")
    configs = {name: stages.get_stage(name, "tiny") for name in TRAIN_ORDER}
    try:
        with FolderLock(out, "--out"):  # one writer per folder: a second demo is refused before it writes
            result = run_demo(out, demo_budget(quick=args.quick, distill=args.distill), configs, seed=args.seed,
                              progress=not args.no_progress)
    except FolderLocked as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {result.report_html}")
    print(f"markdown: {result.report_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
