"""Write the report of a training run: <run>/report.md and <run>/report.png from its metrics.jsonl.

    python tools/run_report.py runs/base32

The figure plots the loss (and per quarter of t), the learning rate, images per second and the quality proxy's
metrics against the step; the Markdown gives the last logging window, the proxy records and links the newest
sample grids. Bad input (no such run folder, no metrics.jsonl): one line, exit code 2.
"""

from __future__ import annotations

import sys

from cascade.cli import OneLineArgumentParser
from cascade.errors import cli_main
from cascade.evaluation.run_report import write_run_report

PROG = "run_report"


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("run", metavar="RUN", help="a run folder (holding metrics.jsonl)")
    args = parser.parse_args(argv)
    path = write_run_report(args.run)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
