"""Write train/val webdataset shards (+ dataset.json) for the cascade from a source of images.

  python tools/make_shards.py --source synthetic --out data/synthetic --images-per-class 200
  python tools/make_shards.py --source photos --out data/photos          # needs the `demo` extra
  python tools/make_shards.py --source digits --out data/digits --val-fraction 0.2   # `demo` extra
  python tools/make_shards.py --source /data/imagenet/train --out data/imagenet --workers 16
  python tools/make_shards.py --source /data/fashion_mnist --out data/fmnist --max-res 32
"""

from __future__ import annotations

import argparse
import sys

from cascade.data.bad_input import BadInputReport
from cascade.data.shards import RESOLUTIONS, write_shards
from cascade.data.sources import get_source
from cascade.errors import cli_main, ensure_writable_dir
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=POLICY,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="'synthetic', 'photos', 'digits' or a folder of class sub-folders (ImageFolder layout)")
    parser.add_argument("--out", required=True, help="output folder for train-*.tar, val-*.tar, dataset.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="fraction of each class for val")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, shuffles and generated images")
    parser.add_argument("--workers", type=int, default=1, help="processes decoding/resizing images")
    parser.add_argument("--images-per-class", type=int, default=None,
                        help="images per class for generated sources (default 100); "
                             "for digits at most this many (default all)")
    parser.add_argument("--num-classes", type=int, default=None, help="classes of the synthetic source (default 10)")
    parser.add_argument("--max-res", type=int, default=256, choices=RESOLUTIONS,
                        help="largest resolution written; only sizes ≤ it are stored (default 256)")
    parser.add_argument("--min-size", type=int, default=16,
                        help="skip images whose short side is below this many pixels (default 16)")
    parser.add_argument("--no-hflip", action="store_true",
                        help="declare that a mirror image is not of its class (digits, text, oriented symbols): "
                             "training and CAS then never flip these images (dataset.json \"hflip\": false; "
                             "the built-in digits source declares it itself)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


@cli_main(PROG, bad_input=(), interrupted="interrupted; the output folder holds no complete dataset (no "
                                            "dataset.json); run the same command to write it")
def main(argv=None) -> dict | int:
    """Returns dataset.json's dict; bad input raises SystemExit with one line; failures return an exit code."""
    args = parse_args(argv)
    try:
        source = get_source(args.source, seed=args.seed, images_per_class=args.images_per_class,
                            num_classes=args.num_classes)
        if args.no_hflip:
            source.hflip = False
        ensure_writable_dir(args.out, "--out")
        with FolderLock(args.out, "--out"):  # one writer per --out: a second run is refused before it writes
            info = write_shards(source, args.out, shard_size=args.shard_size, val_fraction=args.val_fraction,
                                seed=args.seed, workers=args.workers, max_res=args.max_res,
                                min_size=args.min_size, overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, OSError, ImportError) as exc:
        raise SystemExit(f"make_shards: error: {exc}") from None
    counts = info["counts"]
    print(f"wrote {counts['train']['total']} train / {counts['val']['total']} val samples of "
          f"{info['num_classes']} classes at {info['resolutions']} to {args.out} "
          f"({len(info['shards']['train'])} + {len(info['shards']['val'])} shards); training flips images "
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
