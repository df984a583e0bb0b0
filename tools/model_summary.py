"""Print parameter counts and forward FLOPs per image for every stage and size preset.

Usage: python tools/model_summary.py [--num-classes N] [--sizes tiny paper] [--stages base32 ...]
Models are built on the meta device, so the paper presets cost no memory or compute.
"""

from __future__ import annotations

import sys

import torch

import stages
from cascade.cli import OneLineArgumentParser, int_at_least
from cascade.errors import cli_main


@cli_main("model_summary")
def main(argv: list[str] | None = None) -> int:
    """Prints the table; returns 0 (bad input: one line, 2)."""
    parser = OneLineArgumentParser(prog="model_summary", description=__doc__.splitlines()[0])
    parser.add_argument("--num-classes", type=int_at_least(1), default=10)
    parser.add_argument("--sizes", nargs="+", default=list(stages.SIZES), choices=stages.SIZES)
    parser.add_argument("--stages", nargs="+", default=list(stages.STAGE_NAMES), choices=stages.STAGE_NAMES)
    args = parser.parse_args(argv)
    print(f"{'stage':<13} {'size':<6} {'resolution':<10} {'params':>12} {'GFLOP/img':>10}")
    for size in args.sizes:
        for name in args.stages:
            cfg = stages.get_stage(name, size, args.num_classes)
            with torch.device("meta"):
                model = stages.build_model(cfg)
            res = f"{cfg.low_resolution}->{cfg.resolution}" if cfg.low_resolution else str(cfg.resolution)
            print(
                f"{name:<13} {size:<6} {res:<10} {stages.count_parameters(model):>12,} "
                f"{stages.forward_flops(cfg, model) / 1e9:>10.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
