"""Benchmark the cascade's networks on this machine: FLOPs, training and sampling speed, ceilings, memory.

  python tools/bench.py                                   # every tiny stage + the ~35M 32² model, fp32
  python tools/bench.py --modes fp32,cl,bf16+cl           # several modes (fp32, bf16, cl, compile; join with +)
  python tools/bench.py --stages base32,big32 --compare diffusers
  python tools/bench.py --quick --stages base32           # smoke run
  python tools/bench.py --stages base32 --compile         # + compile time and steady-state gain of torch.compile
  python tools/bench.py --stages base32 --trainer         # + the trainer's img/s against its bare step

Training is timed through the library's own step (`cascade.training.step.TrainStep`), on one batch held on the
device: the "bare step"; every (model, mode) runs in its own process, so its peak memory is its own
(`cascade.harness.bench`, `cascade.harness.bench_measure`). Prints one line per measurement, then the table;
writes the report as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from cascade.cli import OneLineArgumentParser
from cascade.errors import cli_main
from cascade.harness.bench import BENCH_STAGES, BenchSettings, format_report, run_bench


@cli_main("bench", bad_input=(ValueError, ImportError))
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="bench", description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default=",".join(BENCH_STAGES), help=f"comma list of {BENCH_STAGES}")
    parser.add_argument("--modes", default="fp32", help="comma list of modes, tokens fp32|bf16|cl|compile joined by +")
    parser.add_argument("--batch-size", type=int, default=None, help="override every stage's batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats (the median is reported)")
    parser.add_argument("--sample-steps", type=int, default=4, help="DDIM steps timed for sampling (0: skip)")
    parser.add_argument("--w", type=float, default=1.0, help="classifier-free guidance weight w")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--compare", choices=["diffusers"], default=None)
    parser.add_argument("--data-workers", type=int, default=None,
                        help="loader workers (default: what data.num_workers=auto picks here)")
    parser.add_argument("--no-data", action="store_true", help="skip the data loader measurement")
    parser.add_argument("--compile", action="store_true",
                        help="also run every mode under torch.compile: prints compile time and steady-state gain")
    parser.add_argument("--trainer", action="store_true",
                        help="also train each stage with the trainer (synthetic shards) and compare with the bare step")
    parser.add_argument("--trainer-steps", type=int, default=60, help="steps of each --trainer run (default 60)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 step, 1 repeat, 1 sampling step")
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    args = parser.parse_args(argv)
    settings = BenchSettings(
        stages=tuple(s for s in args.stages.split(",") if s), modes=tuple(m for m in args.modes.split(",") if m),
        batch_size=args.batch_size, steps=args.steps, repeats=args.repeats, sample_steps=args.sample_steps, w=args.w,
        device=args.device, threads=args.threads, compare_diffusers=args.compare == "diffusers",
        data_workers=args.data_workers, data=not args.no_data, compile=args.compile, trainer=args.trainer,
        trainer_steps=args.trainer_steps, quick=args.quick)

    import stages

    report = run_bench(settings, stages.get_stage)
    print(f"\n{format_report(report)}")
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
