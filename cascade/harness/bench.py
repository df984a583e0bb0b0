"""Benchmark the cascade's networks on this machine: FLOPs, training and sampling speed, ceilings, memory.

`run_bench(settings, preset)` measures every (network, mode) of `BenchSettings` in its own process
(`cascade.harness.bench_measure`), so that each peak memory (ru_maxrss, or CUDA max allocated) is its own;
optionally against diffusers' FLOP-matched UNet2DModel, with the trainer's throughput against its bare step,
and the loader's throughput per stage. It returns the JSON-able report that `format_report` prints as a table.
The whole chain's sampling speed (teacher, student and mixed stages; `tools/bench.py --cascade`) is
`cascade.harness.cascade_speed`'s.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from cascade.config import StageConfig
from cascade.harness.bench_diffusers import require_diffusers
from cascade.harness.bench_measure import MODE_TOKENS, measure_loader_throughput, parse_mode
from cascade.harness.bench_profile import format_profiles

BENCH_STAGES = ("base32", "sr64", "sr128", "sr256", "classifier32", "big32")
DEFAULT_BATCH = {"base32": 32, "sr64": 16, "sr128": 8, "sr256": 4, "classifier32": 32, "big32": 16}
# big32: a ~35M-parameter 32² base model, the tiny base32 stage widened.
# The stage sizes of the loader benchmark: (stage, resolution, low resolution).
LOADER_STAGES = (("base32", 32, None), ("sr64", 64, 32), ("sr128", 128, 64), ("sr256", 256, 128))
BIG32_UNET = {"model_channels": 128, "channel_mult": [1, 2, 2], "num_res_blocks": 2, "attention_resolutions": [16, 8],
              "cross_attention_resolutions": [], "head_channels": 64, "norm_groups": 32}

Preset = Callable[[str, str, int], StageConfig]  # (stage name, size, class count) → StageConfig
Progress = Callable[[str], None]


def print_progress(line: str) -> None:
    print(line, flush=True)


__all__ = ["BENCH_STAGES", "DEFAULT_BATCH", "LOADER_STAGES", "MODE_TOKENS", "BenchSettings", "bench_stage", "compile_gains",
           "format_report", "format_table", "loader_throughputs", "parse_mode", "run_bench"]


@dataclass(frozen=True)
class BenchSettings:
    """What one benchmark run measures (the flags of `tools/bench.py`)."""

    stages: tuple[str, ...] = BENCH_STAGES
    modes: tuple[str, ...] = ("fp32",)
    batch_size: int | None = None  # every stage's batch size (default: DEFAULT_BATCH)
    steps: int = 3  # timed training steps per repeat
    repeats: int = 3  # the median is reported
    sample_steps: int = 4  # DDIM steps timed for sampling (0: skip)
    w: float = 1.0  # classifier-free guidance weight
    device: str = "cpu"
    threads: int | None = None  # torch.set_num_threads (default: torch's)
    compare_diffusers: bool = False
    data_workers: int | None = None  # loader workers (default: what data.num_workers=auto picks)
    data: bool = True  # measure the data loader
    compile: bool = False  # also every mode under torch.compile
    trainer: bool = False  # also train each stage with the trainer and compare with the bare step
    trainer_steps: int = 60
    quick: bool = False  # smoke run: 1 step, 1 repeat, 1 sampling step
    profile: int = 0  # > 0: profile that many training steps and a sampling run by kind (`bench_profile`)

    def resolved(self) -> BenchSettings:
        """Checked (stage names, mode tokens, diffusers when compared) and with the quick run's counts and the
        compiled modes filled in; the loader's workers default to what the trainer picks here."""
        for name in self.stages:
            if name not in BENCH_STAGES:
                raise ValueError(f"unknown bench model {name!r}; valid: {BENCH_STAGES}")
        for mode in self.modes:
            parse_mode(mode)
        if isinstance(self.profile, bool) or not isinstance(self.profile, int) or self.profile < 0:
            raise ValueError(f"--profile takes a number of training steps >= 1, got {self.profile!r}")
        if self.compare_diffusers:
            require_diffusers()
        modes = self.modes
        if self.compile:  # each mode also compiled, to print compile time and steady-state gain side by side
            modes = tuple(v for m in modes for v in ([m] if parse_mode(m)["compile"] else [m, f"{m}+compile"]))
        changes = {"modes": modes}
        if self.quick:
            changes.update(steps=1, repeats=1, sample_steps=min(self.sample_steps, 1),
                           trainer_steps=min(self.trainer_steps, 20))
        if self.data_workers is None:  # the trainer's default (data.num_workers=auto) for this device and threads
            from cascade.data.settings import DataConfig
            from cascade.data.workers import resolve_num_workers

            if self.threads:
                torch.set_num_threads(self.threads)
            changes["data_workers"] = resolve_num_workers(DataConfig.__dataclass_fields__["num_workers"].default,
                                                          torch.device(self.device))
        return BenchSettings(**{**asdict(self), **changes})


def bench_stage(name: str, preset: Preset, num_classes: int = 10) -> StageConfig:
    """The StageConfig of a bench model: a tiny stage, or ``big32`` (a ~35M-parameter 32² base model)."""
    if name == "big32":
        return preset("base32", "tiny", num_classes).with_overrides({"unet": BIG32_UNET})
    if name not in BENCH_STAGES:
        raise ValueError(f"unknown bench model {name!r}; valid: {BENCH_STAGES}")
    return preset(name, "tiny", num_classes)


def _spawn(s: BenchSettings, model: str, stage: str, cfg: StageConfig, mode: str, batch: int) -> dict:
    spec = {"model": model, "stage": stage, "config": cfg.to_dict(), "mode": mode, "batch": batch,
            "steps": s.steps, "repeats": s.repeats, "sample_steps": s.sample_steps, "device": s.device,
            "threads": s.threads, "w": s.w, "trainer_steps": s.trainer_steps, "num_workers": s.data_workers,
            "profile": s.profile}
    proc = subprocess.run([sys.executable, "-m", "cascade.harness.bench_measure", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {model}/{stage}/{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_gains(results: list[dict]) -> list[dict]:
    """For every compiled result with an eager twin (same model, stage, mode without +compile): compile time
    (first step minus a steady step), steady-state speed-up and the steps after which compiling pays off."""
    out = []
    for r in results:
        tokens = r["mode"].split("+")
        if "compile" not in tokens:
            continue
        eager_mode = "+".join(t for t in tokens if t != "compile") or "fp32"
        eager = next((e for e in results
                      if (e["model"], e["stage"], e["mode"]) == (r["model"], r["stage"], eager_mode)), None)
        if eager is None:
            continue
        compile_s = r["first_step_s"] - r["train_step_s"]
        saved = eager["train_step_s"] - r["train_step_s"]
        out.append({"model": r["model"], "stage": r["stage"], "mode": eager_mode, "compile_s": compile_s,
                    "eager_step_s": eager["train_step_s"], "compiled_step_s": r["train_step_s"],
                    "speedup": eager["train_step_s"] / r["train_step_s"],
                    "break_even_steps": compile_s / saved if saved > 0 else None})
    return out


def measure_data(configs: dict[str, StageConfig], batches: dict[str, int], num_batches: int,
                 num_workers: int) -> dict:
    """Loader images/s per stage on a small synthetic shard set written to a temporary folder."""
    from cascade.data.shards import write_shards
    from cascade.data.sources import SyntheticSource

    out = {}
    if not configs:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        need = max(cfg.resolution for cfg in configs.values())
        write_shards(SyntheticSource(num_classes=10, images_per_class=8), tmp, shard_size=20, val_fraction=0.0,
                     max_res=need)
        for name, cfg in configs.items():
            out[name] = measure_loader_throughput(tmp, cfg.resolution, cfg.low_resolution, batches[name],
                                                  num_workers, num_batches)
    return out


def loader_throughputs(root: str | None, batch_size: int, num_workers: int,
                       num_batches: int) -> Iterator[tuple[str, int, int | None, float]]:
    """(stage, resolution, low resolution, images/s) of the train loader for each of `LOADER_STAGES` whose
    resolution the shard folder ``root`` holds; without ``root``, on a temporary synthetic shard set."""
    from cascade.data.shard_folder import read_dataset_info
    from cascade.data.shards import write_shards
    from cascade.data.sources import SyntheticSource

    with tempfile.TemporaryDirectory() as tmp:
        if root is None:
            root = tmp
            write_shards(SyntheticSource(num_classes=10, images_per_class=40), tmp, shard_size=50, val_fraction=0.0)
        available = read_dataset_info(root)["resolutions"]
        for name, res, low in LOADER_STAGES:
            if res in available:
                yield name, res, low, measure_loader_throughput(root, res, low, batch_size, num_workers, num_batches)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_bench(settings: BenchSettings, preset: Preset, progress: Progress = print_progress) -> dict:
    """Measure everything ``settings`` asks for (checked first, before any work); ``progress`` gets one line per
    measurement. Returns the report (JSON-able)."""
    s = settings.resolved()
    configs = {name: bench_stage(name, preset) for name in s.stages}
    batches = {n: s.batch_size or DEFAULT_BATCH[n] for n in s.stages}
    results = []
    for name, cfg in configs.items():
        for mode in s.modes:
            results.append(_spawn(s, "cascade", name, cfg, mode, batches[name]))
            progress(f"  measured cascade {name} {mode}: {results[-1]['train_images_per_s']:.1f} img/s")
            if s.compare_diffusers and cfg.kind != "classifier":
                results.append(_spawn(s, "diffusers", name, cfg, mode, batches[name]))
                ratio = results[-2]["train_images_per_s"] / results[-1]["train_images_per_s"]
                results[-2]["vs_diffusers_train_speedup"] = ratio
                progress(f"  measured diffusers {name} {mode}: {results[-1]['train_images_per_s']:.1f} img/s "
                         f"(cascade/diffusers = {ratio:.2f}×, FLOPs ratio "
                         f"{results[-1]['diffusers']['flops_ratio']:.2f})")
    compile_report = compile_gains(results)
    for c in compile_report:
        progress(f"  compile {c['model']} {c['stage']} {c['mode']}: compile {c['compile_s']:.1f} s, step "
                 f"{1e3 * c['eager_step_s']:.1f} → {1e3 * c['compiled_step_s']:.1f} ms ({c['speedup']:.2f}×), "
                 + (f"pays off after {c['break_even_steps']:.0f} steps" if c["break_even_steps"]
                    else "never pays off"))
    trainer = []
    if s.trainer:
        for name, cfg in configs.items():
            for mode in s.modes:
                run = _spawn(s, "trainer", name, cfg, mode, batches[name])
                bare = next(r for r in results if r["model"] == "cascade" and r["stage"] == name and r["mode"] == mode)
                run["bare_step_images_per_s"] = bare["train_images_per_s"]
                run["trainer_vs_bare"] = run["trainer_images_per_s"] / bare["train_images_per_s"]
                trainer.append(run)
                progress(f"  trainer {name} {mode} ({run['num_workers']} workers): "
                         f"{run['trainer_images_per_s']:.1f} img/s = {100 * run['trainer_vs_bare']:.0f}% of the bare "
                         f"step ({bare['train_images_per_s']:.1f}); whole run {run['wall_images_per_s']:.1f} img/s")
    data = {}
    if s.data:
        data = measure_data({n: cfg for n, cfg in configs.items() if n != "big32"}, batches, 2 if s.quick else 10,
                            s.data_workers)
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
            "torch": torch.__version__, "device": s.device, "logical_cpus": os.cpu_count(),
            "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "results": results,
            "compile": compile_report, "trainer": trainer, "data_loader_images_per_s": data}


def format_report(report: dict) -> str:
    """The report as text: one line naming the machine, the table of results, the ceilings."""
    threads = sorted({r["threads"] for r in report["results"]})
    profiles = format_profiles(report["results"])
    return (f"{report['date']}  {report['cpu']}  torch {report['torch']}  {report['device']}  {threads} threads  "
            f"capability {report['cpu_capability']}  mkldnn bf16 {report['mkldnn_bf16_supported']}\n"
            + format_table(report["results"], report["data_loader_images_per_s"])
            + (f"\n\n{profiles}" if profiles else ""))


def _pct(a: float, b: float) -> str:
    return f"{100 * a / b:5.0f}" if b else "    -"


def format_table(results: list[dict], data: dict) -> str:
    """One row per (network, mode): size, FLOPs, training and sampling speed against the ceilings, memory, load
    and the loader's images/s; then the ceilings of each network's dominant conv."""
    head = (f"{'model':9s} {'stage':12s} {'mode':9s} {'bs':>3s} {'params':>7s} {'GF/img':>7s} {'step ms':>8s} "
            f"{'img/s':>7s} {'GF/s':>6s} {'%c32':>5s} {'%c16':>5s} {'%mm32':>5s} {'smp ms':>7s} {'smp GF/s':>8s} "
            f"{'%f32':>5s} {'%f16':>5s} {'MiB':>6s} {'load':>4s} {'data img/s':>10s}")
    lines = [head, "-" * len(head)]
    for r in results:
        c32, c16 = r["ceilings"]["fp32"], r["ceilings"]["bf16"]
        smp = r.get("sample_step_s")
        data_ips = data.get(r["stage"]) if r["model"] == "cascade" else None
        lines.append(
            f"{r['model']:9s} {r['stage']:12s} {r['mode']:9s} {r['batch_size']:3d} {r['params'] / 1e6:6.2f}M "
            f"{r['forward_gflops_per_image']:7.3f} {1e3 * r['train_step_s']:8.1f} {r['train_images_per_s']:7.1f} "
            f"{r['train_gflops_per_s']:6.1f} {_pct(r['train_gflops_per_s'], c32['conv_fwdbwd_gflops'])} "
            f"{_pct(r['train_gflops_per_s'], c16['conv_fwdbwd_gflops'])} "
            f"{_pct(r['train_gflops_per_s'], c32['matmul_gflops'])} "
            + (f"{1e3 * smp:7.1f} {r['sample_gflops_per_s']:8.1f} "
               f"{_pct(r['sample_gflops_per_s'], c32['conv_fwd_gflops'])} "
               f"{_pct(r['sample_gflops_per_s'], c16['conv_fwd_gflops'])} " if smp
               else f"{'-':>7s} {'-':>8s}     -     - ")
            + f"{r['peak_memory_mib']:6.0f} {r['loadavg_1m'][0]:4.1f} "
            + (f"{data_ips:6.0f} ({data_ips / r['train_images_per_s']:.0f}×)" if data_ips else ""))
    lines.append("")
    lines.append("ceilings (GFLOP/s, dominant conv shape at the stated batch; fp32 | bf16):")
    seen = set()
    for r in results:
        key = (r["stage"], r["model"])
        if key in seen:
            continue
        seen.add(key)
        d, c = r["dominant_conv"], r["ceilings"]
        lines.append(
            f"  {r['model']:9s} {r['stage']:12s} conv {d['in_channels']}→{d['out_channels']} @{d['height']}² "
            f"({100 * d['share_of_forward']:.0f}% of fwd): fwd {c['fp32']['conv_fwd_gflops']:.0f} | "
            f"{c['bf16']['conv_fwd_gflops']:.0f}, fwd+bwd {c['fp32']['conv_fwdbwd_gflops']:.0f} | "
            f"{c['bf16']['conv_fwdbwd_gflops']:.0f}, gemm {c['fp32']['matmul_gflops']:.0f} | "
            f"{c['bf16']['matmul_gflops']:.0f}")
    return "\n".join(lines)
