"""Write train/val webdataset shards (+ dataset.json) for the cascade from a source of images.

  python tools/make_shards.py --source synthetic --out data/synthetic --images-per-class 200
  python tools/make_shards.py --source photos --out data/photos          # needs the `demo` extra
  python tools/make_shards.py --source patches --out data/patches --max-res 64 --val-fraction 0.2   # `demo` extra
  python tools/make_shards.py --source digits --out data/digits --val-fraction 0.2   # `demo` extra
  python tools/make_shards.py --source /data/imagenet/train --out data/imagenet --workers 16
  python tools/make_shards.py --source /data/fashion_mnist --out data/fmnist --max-res 32
"""

from __future__ import annotations

import argparse
import sys

from cascade.cli import OneLineArgumentParser, fraction_below_one, int_at_least, show_progress
from cascade.data.bad_input import BadInputReport
from cascade.data.shards import RESOLUTIONS, write_shards
from cascade.data.sources import get_source
from cascade.errors import cli_main, ensure_writable_dir, plural
from cascade.locks import FolderLock

PROG = "make_shards"

POLICY = """bad-input policy: grayscale, palette, CMYK and 16-bit images are converted to 8-bit RGB;
transparent images (alpha, or one transparent colour) are composited on white; images whose short side is below --max-res are upscaled
(bicubic) and counted, below --min-size skipped; unreadable, truncated and non-image files are skipped.
Everything is reported at the end (counts and file names) and stored in dataset.json.

interrupted runs: shards appear only complete and dataset.json last, so an interrupted folder is never read
as a dataset; run the same command again to finish it (same bytes). Errors: one line on stderr; a traceback
only with CASCADE_DEBUG=1."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n")[0], epilog=POLICY,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="'synthetic', 'photos', 'patches' (small varied patches of the photos: a harder "
                             "benchmark), 'digits' or a folder of class sub-folders (ImageFolder layout)")
    parser.add_argument("--out", required=True, help="output folder for train-*.tar, val-*.tar, dataset.json")
    parser.add_argument("--shard-size", type=int_at_least(1), default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--val-fraction", type=fraction_below_one, default=0.05,
                        help="fraction of each class for val, in [0, 1) (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, shuffles and generated images")
    parser.add_argument("--workers", type=int_at_least(0), default=1,
                        help="processes decoding/resizing images (0 or 1: this one; default 1)")
    parser.add_argument("--images-per-class", type=int_at_least(1), default=None,
                        help="images per class for generated sources (default 100; patches 400); "
                             "for digits at most this many (default all)")
    parser.add_argument("--num-classes", type=int_at_least(1), default=None,
                        help="classes of the synthetic source (default 10)")
    parser.add_argument("--max-res", type=int, default=256, choices=RESOLUTIONS,
                        help="largest resolution written; only sizes ≤ it are stored (default 256)")
    parser.add_argument("--min-size", type=int_at_least(1), default=16,
                        help="skip images whose short side is below this many pixels (default 16)")
    parser.add_argument("--no-hflip", action="store_true",
                        help="declare that a mirror image is not of its class (digits, text, oriented symbols): "
                             "training and CAS then never flip these images (dataset.json \"hflip\": false; "
                             "the built-in digits source declares it itself)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


@cli_main(PROG, bad_input=(ValueError, FileNotFoundError, FileExistsError, ImportError),
          interrupted="interrupted; the output folder holds no complete dataset (no dataset.json); run the same "
                      "command to write it")
def main(argv=None) -> dict | int:
    """Returns dataset.json's dict; bad input (a usage error, a missing source, a dataset already in --out) prints
    one line and returns 2 (argparse's usage errors exit 2), another failure (a full disk) one line and 1."""
    args = parse_args(argv)
    source = get_source(args.source, seed=args.seed, images_per_class=args.images_per_class,
                        num_classes=args.num_classes)
    if args.no_hflip:
        source.hflip = False
    ensure_writable_dir(args.out, "--out")
    with FolderLock(args.out, "--out"):  # one writer per --out: a second run is refused before it writes anything
        info = write_shards(source, args.out, shard_size=args.shard_size, val_fraction=args.val_fraction,
                            seed=args.seed, workers=args.workers, max_res=args.max_res, min_size=args.min_size,
                            overwrite=args.overwrite, progress=not args.no_progress and show_progress())
    counts = info["counts"]
    print(f"wrote {counts['train']['total']} train / {plural(counts['val']['total'], 'val sample')} of "
          f"{plural(info['num_classes'], 'class', 'classes')} at {info['resolutions']} to {args.out} "
          f"({len(info['shards']['train'])} + {plural(len(info['shards']['val']), 'shard')}); training flips images "
          + ("at random" if info["hflip"] else "never (mirror images are not of their class)"))
    lines = BadInputReport.from_dict(info["bad_input"]).summary_lines()
    print("bad input: none" if not lines else "bad input:\n  " + "\n  ".join(lines))
    if counts["val"]["total"] == 0:
        print(f"{PROG}: warning: the val split is empty (--val-fraction {args.val_fraction} rounds to 0 images "
              "per class); training works without it, evaluation (eval_fid.py, sweep.py) needs one: raise "
              "--val-fraction or the number of images", file=sys.stderr)
    return info


if __name__ == "__main__":
    result = main(sys.argv[1:])
    sys.exit(result if isinstance(result, int) else 0)
