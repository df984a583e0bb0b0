"""Print the stage loader's throughput (images/s) for every stage size.

  python tools/bench_data.py                       # on a temporary synthetic dataset
  python tools/bench_data.py --root data/photos --num-workers 4 --batch-size 64
"""

from __future__ import annotations

import argparse
import sys

from cascade.harness.bench import loader_throughputs


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="shard folder (default: write a temporary synthetic one)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--num-batches", type=int, default=20)
    args = parser.parse_args(argv)
    results = {}
    for name, res, low, images_per_s in loader_throughputs(args.root, args.batch_size, args.num_workers,
                                                            args.num_batches):
        results[name] = images_per_s
        print(f"{name:7s} {res:3d}²{'' if low is None else f' + {low}²':8s} {images_per_s:8.0f} images/s "
              f"(batch {args.batch_size}, {args.num_workers} workers)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
