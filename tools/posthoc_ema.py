"""Reconstruct a post-hoc EMA of a training run from its power-EMA snapshots (EDM2 §3.2; docs/ema.md).

    python tools/posthoc_ema.py runs/base32 --sigma-rel 0.05
    python tools/posthoc_ema.py runs/base32 --sigma-rel 0.03,0.05,0.1 --step 20000

Writes a normal checkpoint: the run's checkpoint at that step (or its newest) with its EMA weights replaced by the
reconstruction, its config.json recording ``ema: {kind: posthoc, sigma_rel, snapshots, ...}``. One σ_rel: into
--out (default <run>/posthoc/sigma-0.050); several: into <out>/sigma-X.XXX each (default <run>/posthoc).
`tools/sample_cascade.py --ckpt base32=PATH` and `tools/eval_fid.py` load it as any run folder.
Bad inputs (no snapshots, σ_rel out of range, an unwritable --out) give one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cascade.cli import OneLineArgumentParser, int_at_least
from cascade.errors import cli_main, ensure_writable_dir

PROG = "posthoc_ema"


def parse_sigma_rels(text: str) -> list[float]:
    """`0.03,0.05` → [0.03, 0.05]; ValueError (one line naming --sigma-rel) for anything else or a value out of
    (0, 0.3)."""
    from cascade.ema_profiles import check_sigma_rels

    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--sigma-rel: expected numbers such as 0.05 or 0.03,0.05,0.1, got {text!r}") from None
    check_sigma_rels(tuple(values), "--sigma-rel")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run folder (holding ema_snapshots/ and checkpoints/)")
    p.add_argument("--sigma-rel", required=True, help="the EMA's relative width(s) in (0, 0.3): 0.05 or 0.03,0.05,0.1")
    p.add_argument("--step", type=int_at_least(1), default=None,
                   help="reconstruct at this snapshot's step (default: the last snapshot)")
    p.add_argument("--out", default=None, help="output run folder (several σ_rel: their parent folder)")
    return p


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sigma_rels = parse_sigma_rels(args.sigma_rel)
    run = Path(args.run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    from cascade.training.posthoc_ema import posthoc_ema, posthoc_out_dir, write_posthoc_checkpoint

    if len(sigma_rels) == 1:
        outs = [Path(args.out) if args.out else posthoc_out_dir(run, sigma_rels[0])]
    else:
        parent = Path(args.out) if args.out else run / "posthoc"
        outs = [parent / posthoc_out_dir(run, s).name for s in sigma_rels]
    for out in outs:
        ensure_writable_dir(out, "--out")  # before any work
    for result, out in zip(posthoc_ema(run, sigma_rels, args.step), outs):
        path = write_posthoc_checkpoint(run, result, out)
        print(f"σ_rel={result.sigma_rel:g} (γ={result.gamma:.3f}) at step {result.step} from "
              f"{len(result.snapshots)} snapshots → {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
