"""Print the stage loader's throughput (images/s) for every stage size.

  python tools/bench_data.py                       # on a temporary synthetic dataset
  python tools/bench_data.py --root data/photos --num-workers 4 --batch-size 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from cascade.data.loader import make_stage_loader
from cascade.data.shard_folder import read_dataset_info
from cascade.data.shards import write_shards
from cascade.data.sources import SyntheticSource

STAGE_SIZES = (("base32", 32, None), ("sr64", 64, 32), ("sr128", 128, 64), ("sr256", 256, 128))


def measure_loader_throughput(root, stage_resolution: int, low_resolution: int | None, batch_size: int,
                              num_workers: int, num_batches: int) -> float:
    """Images per second of the train loader, timed after its first batch (worker start-up excluded)."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be ≥ 1, got {num_batches}")
    loader = make_stage_loader(root, split="train", resolution=stage_resolution, low_resolution=low_resolution,
                               batch_size=batch_size, num_workers=num_workers, epoch_length=num_batches + 1)
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    images = sum(batch["x"].shape[0] for batch in batches)
    return images / (time.perf_counter() - start)


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="shard folder (default: write a temporary synthetic one)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--num-batches", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = tmp
            write_shards(SyntheticSource(num_classes=10, images_per_class=40), tmp, shard_size=50, val_fraction=0.0)
        available = read_dataset_info(root)["resolutions"]
        results = {}
        for name, res, low in STAGE_SIZES:
            if res not in available:
                continue
            results[name] = measure_loader_throughput(root, res, low, args.batch_size, args.num_workers,
                                                      args.num_batches)
            print(f"{name:7s} {res:3d}²{'' if low is None else f' + {low}²':8s} {results[name]:8.0f} images/s "
                  f"(batch {args.batch_size}, {args.num_workers} workers)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
