"""Benchmark the cascade's networks on this machine: FLOPs, training and sampling speed, ceilings, memory.

  python tools/bench.py                                   # every tiny stage + the ~35M 32² model, fp32
  python tools/bench.py --modes fp32,cl,bf16+cl           # several modes (fp32, bf16, cl, compile; join with +)
  python tools/bench.py --stages base32,big32 --compare diffusers
  python tools/bench.py --quick --stages base32           # smoke run
  python tools/bench.py --stages base32 --compile         # + compile time and steady-state gain of torch.compile
  python tools/bench.py --stages base32 --trainer         # + the trainer's img/s against its bare step
  python tools/bench.py --stages base32,big32 --modes bf16+cl --compare diffusers --profile   # time by kind
  python tools/bench.py --cascade                         # seconds per 256² image: teachers, students, mixed
  python tools/bench.py --cascade --quick --stages base32,sr64 --mixed base32   # its smoke run

Training is timed through the library's own step (`cascade.training.step.TrainStep`), on one batch held on the
device: the "bare step"; every (model, mode) runs in its own process, so its peak memory is its own
(`cascade.harness.bench`, `cascade.harness.bench_measure`). Prints one line per measurement, then the table;
writes the report as JSON. --profile adds, per network and mode, where a training step (its batch fetched from the
stage's loader, as in a run) and a guided sampling step spend their time, by kind of work
(`cascade.harness.bench_profile`), with the time outside convolutions as a ratio of the convolutions'.

--cascade times sampling through the whole chain instead (`cascade.harness.cascade_speed`): the tiny stages of
--stages (default base32,sr64,sr128,sr256) with fresh weights, --images images (default 4) in one batch, in three
configurations: every stage at its own defaults (teachers), every stage its distilled student (--distill-method,
default tools/distill_stage.py's: step distillation, DDIM in 4 steps for base32 and 2 for an SR stage), and --mixed
(default base32,sr64) distilled with teachers after.
Per configuration: NFE per image per stage, seconds per final image, images per second, speed-up over the teachers,
in a Markdown table naming the CPU, threads and precision (--precision).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from cascade.cli import OneLineArgumentParser
from cascade.errors import cli_main
from cascade.harness.bench import BENCH_STAGES, BenchSettings, format_report, run_bench
from cascade.pipeline.cascade_pipeline import DEFAULT_CHAIN, PRECISIONS


@cli_main("bench", bad_input=(ValueError, ImportError))
def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="bench", description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default=None,
                        help=f"comma list of {BENCH_STAGES} (default all); with --cascade the chain (default "
                             f"{','.join(DEFAULT_CHAIN)})")
    parser.add_argument("--modes", default="fp32", help="comma list of modes, tokens fp32|bf16|cl|compile joined by +")
    parser.add_argument("--batch-size", type=int, default=None, help="override every stage's batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per repeat")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repeats, the median is reported (default 3; with --cascade 1)")
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
    parser.add_argument("--profile", type=int, nargs="?", const=3, default=0, metavar="STEPS",
                        help="also profile STEPS training steps (default 3; each fetching its batch from the loader) "
                             "and a guided sampling run: time per step by kind (convolution, matmul/attention, "
                             "normalisation, activation, elementwise, casts, optimizer, EMA, data, other), beside "
                             "diffusers' with --compare diffusers")
    parser.add_argument("--chunks", default=None, metavar="SIZES",
                        help="instead: images/s per sampling step of each stage of --stages by chunk size (comma "
                             "list, e.g. 1,4,16,64) and layout, through the pipeline's own stage sampler")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 step, 1 repeat, 1 sampling step (--cascade: 1 image, 1 repeat)")
    parser.add_argument("--cascade", action="store_true",
                        help="time sampling through the whole chain (teachers, students, mixed) instead")
    parser.add_argument("--images", type=int, default=None, metavar="K",
                        help="--cascade: images per timed run, in one batch (default 4; --quick 1)")
    parser.add_argument("--mixed", default=None, metavar="STAGES",
                        help="--cascade: the stages distilled in the mixed configuration (default base32,sr64: those "
                             "of them in the chain)")
    parser.add_argument("--distill-method", default=None, choices=("step", "consistency", "guidance"),
                        help="--cascade: how the students are distilled (default step: DDIM in 4 steps for a base "
                             "stage, 2 for an SR stage; consistency: the consistency sampler in as many; guidance: "
                             "the teacher's sampler and steps, w as an input)")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="--cascade, --chunks: sampling precision (default auto: bf16 where the device computes it "
                             "natively)")
    parser.add_argument("--json", default=None, help="where to write the results (default bench.json; with --cascade "
                                                     "bench_cascade.json)")
    args = parser.parse_args(argv)
    if args.cascade:
        return cascade_main(args)
    if args.chunks is not None:
        for option, given in (("--compare", args.compare), ("--trainer", args.trainer), ("--compile", args.compile),
                              ("--batch-size", args.batch_size is not None), ("--modes", args.modes != "fp32"),
                              ("--profile", args.profile)):
            if given:
                raise ValueError(f"{option} does not apply to --chunks (it times the pipeline's stage sampler in "
                                 "both layouts at --precision)")
        return chunks_main(args)
    for option, value in (("--images", args.images), ("--precision", args.precision), ("--mixed", args.mixed),
                          ("--distill-method", args.distill_method)):
        if value is not None:
            raise ValueError(f"{option} applies to --cascade only")
    settings = BenchSettings(
        stages=tuple(s for s in (args.stages or ",".join(BENCH_STAGES)).split(",") if s),
        modes=tuple(m for m in args.modes.split(",") if m), batch_size=args.batch_size, steps=args.steps,
        repeats=3 if args.repeats is None else args.repeats, sample_steps=args.sample_steps, w=args.w,
        device=args.device, threads=args.threads, compare_diffusers=args.compare == "diffusers",
        data_workers=args.data_workers, data=not args.no_data, compile=args.compile, trainer=args.trainer,
        trainer_steps=args.trainer_steps, quick=args.quick, profile=args.profile)

    import stages

    report = run_bench(settings, stages.get_stage)
    print(f"\n{format_report(report)}")
    out = args.json or "bench.json"
    Path(out).write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def chunks_main(args) -> int:
    """--chunks: images/s per sampling step by chunk size and layout (`cascade.harness.sampling_chunks`)."""
    from cascade.device import resolve_sampling_precision
    from cascade.harness.bench import bench_stage, cpu_name
    from cascade.harness.sampling_chunks import format_chunks, measure_chunks

    try:
        sizes = tuple(int(s) for s in args.chunks.split(",") if s)
    except ValueError:
        raise ValueError(f"--chunks takes a comma list of chunk sizes, e.g. 1,4,16,64; got {args.chunks!r}") from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import stages

    names = [s for s in (args.stages or "base32,sr64,sr128,sr256").split(",") if s]
    configs = {n: bench_stage(n, stages.get_stage) for n in names}
    precision = resolve_sampling_precision(args.precision or "auto", torch.device(args.device))
    rows = measure_chunks(configs, sizes, device=args.device, precision=precision,
                          steps=1 if args.quick else 2, repeats=1 if args.quick else (args.repeats or 2))
    print(f"\n{cpu_name()}  {torch.get_num_threads()} threads  {precision}\n{format_chunks(rows, args.device)}")
    out = args.json or "bench_chunks.json"
    Path(out).write_text(json.dumps({"cpu": cpu_name(), "threads": torch.get_num_threads(), "precision": precision,
                                     "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


def cascade_main(args) -> int:
    """--cascade: the whole chain's sampling speed (`cascade.harness.cascade_speed`)."""
    from cascade.harness.cascade_speed import CascadeSpeedSettings, format_cascade_speed, run_cascade_speed
    from cascade.training.trainer_config import DistillSettings

    for option, given in (("--compare", args.compare), ("--trainer", args.trainer), ("--compile", args.compile),
                          ("--batch-size", args.batch_size is not None), ("--modes", args.modes != "fp32"),
                          ("--profile", args.profile), ("--chunks", args.chunks is not None)):
        if given:
            raise ValueError(f"{option} does not apply to --cascade (it samples the chain with each stage's own "
                             "settings)")
    chain = tuple(s for s in (args.stages or ",".join(DEFAULT_CHAIN)).split(",") if s)
    mixed = (tuple(s for s in args.mixed.split(",") if s) if args.mixed is not None
             else tuple(s for s in ("base32", "sr64") if s in chain))
    settings = CascadeSpeedSettings(
        stages=chain,
        images=args.images if args.images is not None else 1 if args.quick else 4,
        repeats=args.repeats if args.repeats is not None else 1,
        mixed=mixed, precision=args.precision or "auto", device=args.device,
        distill=DistillSettings(method=args.distill_method or DistillSettings.method))
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    import stages

    report = run_cascade_speed(settings, stages.get_stage)
    print(f"\n{format_cascade_speed(report)}")
    out = args.json or "bench_cascade.json"
    Path(out).write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
