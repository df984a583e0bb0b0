"""Print the stage loader's throughput (images/s) for every stage size.

  python tools/bench_data.py                       # on a temporary synthetic dataset
  python tools/bench_data.py --root data/photos --num-workers 4 --batch-size 64
"""

from __future__ import annotations

import sys

from cascade.cli import OneLineArgumentParser, int_at_least
from cascade.errors import cli_main
from cascade.harness.bench import loader_throughputs


@cli_main("bench_data")
def main(argv=None) -> dict[str, float] | int:
    """{stage: images/s}; bad input prints one line and returns 2, another failure one line and 1."""
    parser = OneLineArgumentParser(prog="bench_data", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="shard folder (default: write a temporary synthetic one)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32)
    parser.add_argument("--num-workers", type=int_at_least(0), default=2)
    parser.add_argument("--num-batches", type=int_at_least(1), default=20)
    args = parser.parse_args(argv)
    results = {}
    for name, res, low, images_per_s in loader_throughputs(args.root, args.batch_size, args.num_workers,
                                                            args.num_batches):
        results[name] = images_per_s
        print(f"{name:7s} {res:3d}²{'' if low is None else f' + {low}²':8s} {images_per_s:8.0f} images/s "
              f"(batch {args.batch_size}, {args.num_workers} workers)")
    return results


if __name__ == "__main__":
    result = main(sys.argv[1:])
    sys.exit(result if isinstance(result, int) else 0)
