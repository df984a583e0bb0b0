"""Benchmark the cascade's networks on this machine: FLOPs, training and sampling speed, ceilings, memory.

  python tools/bench.py                                   # every tiny stage + the ~35M 32² model, fp32
  python tools/bench.py --modes fp32,cl,bf16+cl           # several modes (fp32, bf16, cl, compile; join with +)
  python tools/bench.py --stages base32,big32 --compare diffusers
  python tools/bench.py --quick --stages base32           # smoke run
  python tools/bench.py --stages base32 --compile         # + compile time and steady-state gain of torch.compile
  python tools/bench.py --stages base32 --trainer         # + the trainer's img/s against its bare step

Training is timed through the library's own step (`cascade.training.step.TrainStep`: autocast, loss, backward, clipping,
fused AdamW, LR schedule, EMA update), on one batch held on the device: the "bare step".
Every (model, mode) runs in its own subprocess so peak memory (ru_maxrss, or CUDA max allocated) is its own.
The conv and matmul ceilings are measured in the same run with the model's dominant 3×3 conv shape (its
largest total-FLOP conv at the stated batch size) and the same conv as an im2col GEMM, fp32 and bf16.
Training FLOP/s counts forward + backward as 3× the forward FLOPs (FlopCounterMode).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import stages
from cascade.diffusion.guidance import classifier_free_guidance
from cascade.diffusion.samplers import sample_ddim
from cascade.training.ema import EMA
from cascade.training.losses import example_batch, make_stage_loss
from cascade.training.optimizer import make_optimizer
from cascade.training.runtime import make_accelerator
from cascade.training.step import TrainStep, new_window
from cascade.training.timestep_sampler import UniformSampler
from cascade.training.trainer_config import TrainerConfig

BENCH_STAGES = ("base32", "sr64", "sr128", "sr256", "classifier32", "big32")
DEFAULT_BATCH = {"base32": 32, "sr64": 16, "sr128": 8, "sr256": 4, "classifier32": 32, "big32": 16}
MODE_TOKENS = ("fp32", "bf16", "cl", "compile")


def stage_config(name: str, num_classes: int = 10):
    """The StageConfig of a bench model: a tiny stage, or ``big32`` (a ~35M-parameter 32² base model)."""
    if name == "big32":
        return stages.get_stage("base32", "tiny", num_classes).with_overrides({"unet": {
            "model_channels": 128, "channel_mult": [1, 2, 2], "num_res_blocks": 2,
            "attention_resolutions": [16, 8], "cross_attention_resolutions": [], "head_channels": 64,
            "norm_groups": 32}})
    if name not in BENCH_STAGES:
        raise ValueError(f"unknown bench model {name!r}; valid: {BENCH_STAGES}")
    return stages.get_stage(name, "tiny", num_classes)


def parse_mode(mode: str) -> dict:
    tokens = mode.split("+")
    bad = [t for t in tokens if t not in MODE_TOKENS]
    if bad:
        raise ValueError(f"unknown mode token(s) {bad} in {mode!r}; valid tokens: {MODE_TOKENS} joined by '+'")
    return {"bf16": "bf16" in tokens, "channels_last": "cl" in tokens, "compile": "compile" in tokens}


# ------------------------------------------------------------------------------------------ timing helpers

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, iters: int, repeats: int, warmup: int = 1) -> float:
    """Median over ``repeats`` of the mean seconds per call of ``fn`` over ``iters`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


# ------------------------------------------------------------------------------------------ ceilings

def dominant_conv(model: nn.Module, inputs: dict) -> dict:
    """The 3×3 conv shape holding the most forward FLOPs in one forward pass (batch 1)."""
    totals: dict[tuple, int] = {}
    hooks = []

    def hook(mod, args, out):
        x = args[0]
        key = (mod.in_channels, mod.out_channels, mod.kernel_size[0], x.shape[-2], x.shape[-1])
        flops = 2 * mod.in_channels * mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1] * out.shape[-2] * out.shape[-1]
        totals[key] = totals.get(key, 0) + flops

    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    (cin, cout, k, h, w), flops = max(totals.items(), key=lambda kv: kv[1])
    return {"in_channels": cin, "out_channels": cout, "kernel": k, "height": h, "width": w,
            "share_of_forward": flops}


def measure_ceilings(shape: dict, batch: int, device: torch.device, repeats: int) -> dict:
    """GFLOP/s of the dominant conv (fwd, fwd+bwd) and of its im2col GEMM (fwd), fp32 and bf16 (best of
    contiguous / channels_last)."""
    cin, cout, k, h, w = (shape[n] for n in ("in_channels", "out_channels", "kernel", "height", "width"))
    conv_flops = 2 * batch * cin * cout * k * k * h * w
    out = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        fwd, fwdbwd = 0.0, 0.0
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(batch, cin, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
            conv = nn.Conv2d(cin, cout, k, padding=k // 2).to(device=device, dtype=dtype, memory_format=fmt)
            xg = x.clone().requires_grad_(True)

            def forward(conv=conv, x=x):
                with torch.no_grad():
                    conv(x)

            def forward_backward(conv=conv, xg=xg):
                conv(xg).sum().backward()

            iters = max(1, min(20, int(2e9 / conv_flops)))
            fwd = max(fwd, conv_flops / _time(forward, device, iters, repeats) / 1e9)
            fwdbwd = max(fwdbwd, 3 * conv_flops / _time(forward_backward, device, iters, repeats) / 1e9)
        m, kk, n = batch * h * w, cin * k * k, cout
        a = torch.randn(m, kk, device=device, dtype=dtype)
        b = torch.randn(kk, n, device=device, dtype=dtype)
        iters = max(1, min(20, int(2e9 / (2 * m * kk * n))))
        mm = 2 * m * kk * n / _time(lambda a=a, b=b: a @ b, device, iters, repeats) / 1e9
        out[dtype_name] = {"conv_fwd_gflops": fwd, "conv_fwdbwd_gflops": fwdbwd, "matmul_gflops": mm}
    return out


# ------------------------------------------------------------------------------------------ diffusers

def _diffusers():
    try:
        import diffusers
    except ImportError as err:
        raise SystemExit("--compare diffusers needs the optional 'bench' extra: pip install 'cascade[bench]' "
                         f"(or pip install diffusers); import failed: {err}") from None
    return diffusers


class DiffusersAdapter(nn.Module):
    """Calls diffusers' UNet2DModel with the cascade's model signature (SR: concatenates the upsampled x_low;
    the augmentation level is not embedded)."""

    def __init__(self, unet: nn.Module, resolution: int, low_resolution: int | None):
        super().__init__()
        self.unet, self.resolution, self.low_resolution = unet, resolution, low_resolution

    def forward(self, x_t, t, y=None, x_low=None, aug_level=None):
        from cascade.imageops import upsample

        h = x_t if x_low is None else torch.cat([x_t, upsample(x_low, self.resolution).to(x_t.dtype)], dim=1)
        return self.unet(h, t, class_labels=y).sample


def _build_diffusers(cfg, width: int, layers: int) -> nn.Module:
    diffusers = _diffusers()
    u = cfg.unet
    widths = [width * m for m in u.channel_mult]
    groups = math.gcd(u.norm_groups, *widths)
    res, down, up = cfg.resolution, [], []
    for _ in widths:
        down.append("AttnDownBlock2D" if res in u.attention_resolutions else "DownBlock2D")
        res //= 2
    up = ["AttnUpBlock2D" if b == "AttnDownBlock2D" else "UpBlock2D" for b in reversed(down)]
    unet = diffusers.UNet2DModel(
        sample_size=cfg.resolution, in_channels=3 if cfg.low_resolution is None else 6,
        out_channels=6 if cfg.diffusion.learn_sigma else 3, block_out_channels=widths, layers_per_block=layers,
        down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=groups,
        attention_head_dim=min(u.head_channels, min(widths)), resnet_time_scale_shift="scale_shift",
        num_class_embeds=cfg.num_classes + 1, dropout=u.dropout)
    return DiffusersAdapter(unet, cfg.resolution, cfg.low_resolution)


def _count_flops(model: nn.Module, inputs: dict) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops()


def matched_diffusers(cfg, target_flops: int) -> tuple[nn.Module, dict]:
    """diffusers' UNet2DModel at the stage's resolution and channel multipliers with forward FLOPs closest to
    ``target_flops`` (aim: within 10%) over 1–3 layers per block and widths near the stage's."""
    inputs = stages.example_inputs(cfg, 1)
    width, mult = cfg.unet.model_channels, cfg.unet.channel_mult
    step = math.gcd(cfg.unet.norm_groups, 4)

    def flops_of(w, layers):
        return _count_flops(_build_diffusers(cfg, w, layers), inputs)

    best_w, layers, best_f = width, 1, flops_of(width, 1)
    for n in (1, 2, 3):  # FLOPs ≈ quadratic in width: per layer count, scale the width, refine on the grid
        f = best_f if n == 1 else flops_of(width, n)
        guess = width * math.sqrt(target_flops / f)
        for w in sorted({max(step, step * round(guess / step) + d * step) for d in (-1, 0, 1)} | {width}):
            f = flops_of(w, n)
            if abs(f / target_flops - 1) < abs(best_f / target_flops - 1) - 0.02 or (
                    w == width and abs(f / target_flops - 1) <= 0.1):  # prefer the stage's own widths
                best_w, layers, best_f = w, n, f
    info = {"widths": [best_w * m for m in mult], "layers_per_block": layers, "flops_ratio": best_f / target_flops}
    return _build_diffusers(cfg, best_w, layers), info


# ------------------------------------------------------------------------------------------ one config

def run_config(model_name: str, stage_name: str, mode: str, batch: int, steps: int, repeats: int,
               sample_steps: int, device_name: str, threads: int | None, w: float) -> dict:
    """Measure one (model, mode) in this process; returns a JSON-able dict."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    opts = parse_mode(mode)
    torch.manual_seed(0)
    cfg = stage_config(stage_name)
    ours = stages.build_model(cfg)
    ours_flops = stages.forward_flops(cfg, ours)
    extra = {}
    if model_name == "diffusers":
        model, extra = matched_diffusers(cfg, ours_flops)
        flops = _count_flops(model, stages.example_inputs(cfg, 1))
    else:
        model, flops = ours, ours_flops
    del ours
    model.to(device)
    shape = dominant_conv(model, stages.example_inputs(cfg, 1, device))
    shape["share_of_forward"] /= flops
    ceilings = measure_ceilings(shape, batch, device, repeats)
    if opts["channels_last"]:
        model.to(memory_format=torch.channels_last)
    diffusion = stages.build_diffusion(cfg)
    sampler = UniformSampler(diffusion.num_timesteps)
    fmt = torch.channels_last if opts["channels_last"] else torch.contiguous_format
    batch_data = {k: (v.contiguous(memory_format=fmt) if v.ndim == 4 else v)
                  for k, v in example_batch(cfg, batch, device=device).items()}
    # The trainer's own step (cascade.training.step.TrainStep) with the trainer's defaults: accelerate's autocast,
    # fused AdamW, clipping, the non-finite skip, the LR schedule and the EMA update.
    tcfg = TrainerConfig(batch_size=batch, mixed_precision="bf16" if opts["bf16"] else "no")
    acc = make_accelerator(tcfg.mixed_precision, cpu=device.type == "cpu")
    ema = EMA(model, decay=tcfg.ema_decay, warmup=tcfg.ema_warmup)
    optimizer, scheduler, fused = make_optimizer(model, tcfg, device)
    prepared, optimizer = acc.prepare(model, optimizer)
    step = TrainStep(acc, prepared, optimizer, scheduler, ema, make_stage_loss(cfg, diffusion, sampler, tcfg.p_uncond),
                     sampler, grad_clip=tcfg.grad_clip, fused=fused, mixed_precision=tcfg.mixed_precision,
                     nan_total=torch.zeros((), dtype=torch.long, device=device),
                     nan_in_row=torch.zeros((), dtype=torch.long, device=device), compile=opts["compile"])
    runner, window = step.runner, new_window(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def train_step():
        step([batch_data], window)

    model.train()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    train_step()  # the first step: compiles under torch.compile
    _sync(device)
    first_step_s = time.perf_counter() - start
    step_s = _time(train_step, device, steps, repeats, warmup=2 if opts["compile"] else 0)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "model": model_name, "stage": stage_name, "mode": mode, "device": device_name,
        "threads": torch.get_num_threads(), "batch_size": batch, "params": stages.count_parameters(model),
        "forward_gflops_per_image": flops / 1e9, "dominant_conv": shape, "ceilings": ceilings,
        "train_step_s": step_s, "train_images_per_s": batch / step_s, "first_step_s": first_step_s,
        "train_gflops_per_s": 3 * flops * batch / step_s / 1e9, **({"diffusers": extra} if extra else {}),
    }
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # ru_maxrss is in KiB on Linux: the training steps' growth of the process's peak resident set
        result["peak_memory_mib"] = rss_peak / 1024
        result["train_memory_growth_mib"] = (rss_peak - rss_before) / 1024
    if cfg.kind != "classifier" and sample_steps > 0:
        model.eval()
        guided = classifier_free_guidance(runner, w, cfg.num_classes)
        respaced = diffusion.respace(f"ddim{sample_steps}")
        kwargs = {"y": batch_data["y"]}
        if cfg.low_resolution:
            kwargs.update(x_low=batch_data["x_low"], aug_level=torch.full((batch,), 0.1, device=device))
        shape_x = (batch, 3, cfg.resolution, cfg.resolution)

        def sample():
            with torch.no_grad(), _autocast(device, opts["bf16"]):
                sample_ddim(guided, respaced, shape_x, model_kwargs=kwargs)

        total = _time(sample, device, 1, repeats, warmup=1)
        per_step = total / respaced.num_timesteps
        result.update({"sample_steps": respaced.num_timesteps, "sample_step_s": per_step,
                       "sample_images_per_s_per_step": batch / per_step,
                       "sample_gflops_per_s": 2 * flops * batch / per_step / 1e9})  # CFG: 2 forwards per image
    result["loadavg_1m"] = [load_before, os.getloadavg()[0]]
    return result


# ------------------------------------------------------------------------------------------ the trainer

def run_trainer(stage_name: str, mode: str, batch: int, steps: int, device_name: str, threads: int | None,
                num_workers: int) -> dict:
    """Train the stage with `StageTrainer` for ``steps`` steps on a temporary synthetic shard set (logging every
    10 steps, only the final checkpoint, no sample grids); returns its img/s (the metrics log's windows after the
    first, which holds loader start-up and compilation) and the wall-clock img/s of the whole run."""
    from cascade.data.shards import write_shards
    from cascade.data.sources import SyntheticSource
    from cascade.training.trainer import StageTrainer
    from cascade.training.trainer_config import DataConfig, RunConfig

    if threads:
        torch.set_num_threads(threads)
    opts = parse_mode(mode)
    cfg = stage_config(stage_name)
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(SyntheticSource(num_classes=cfg.num_classes, images_per_class=40), f"{tmp}/data",
                     shard_size=50, val_fraction=0.1, max_res=cfg.resolution)
        trainer_cfg = TrainerConfig(max_steps=steps, batch_size=batch, warmup_steps=100, ema_decay=0.999,
                                    log_every=10, ckpt_every=0, sample_every=0, progress=False,
                                    mixed_precision="bf16" if opts["bf16"] else "no",
                                    channels_last=opts["channels_last"], compile=opts["compile"])
        run = RunConfig(run_dir=f"{tmp}/run", data=DataConfig(root=f"{tmp}/data", num_workers=num_workers),
                        trainer=trainer_cfg)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        StageTrainer(cfg, run).run()
        wall = time.perf_counter() - start
        records = [json.loads(ln) for ln in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines() if ln.strip()]
    rates = [r["img_per_s"] for r in records[1:] if r.get("img_per_s")]
    steady = len(rates) / sum(1.0 / r for r in rates) if rates else float("nan")  # equal images per window
    return {"model": "trainer", "stage": stage_name, "mode": mode, "device": device_name, "batch_size": batch,
            "threads": torch.get_num_threads(), "num_workers": num_workers, "steps": steps,
            "trainer_images_per_s": steady, "wall_images_per_s": steps * batch / wall,
            "loadavg_1m": [load_before, os.getloadavg()[0]]}


# ------------------------------------------------------------------------------------------ data loader

def measure_data(stage_names, batches: dict, num_batches: int, num_workers: int) -> dict:
    """Loader images/s per stage on a small synthetic shard set written to a temporary folder."""
    from cascade.data.shards import write_shards
    from cascade.data.sources import SyntheticSource
    from tools.bench_data import measure_loader_throughput

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        need = max(stage_config(s).resolution for s in stage_names)
        write_shards(SyntheticSource(num_classes=10, images_per_class=8), tmp, shard_size=20, val_fraction=0.0,
                     max_res=need)
        for name in stage_names:
            cfg = stage_config(name)
            out[name] = measure_loader_throughput(tmp, cfg.resolution, cfg.low_resolution, batches[name],
                                                  num_workers, num_batches)
    return out


# ------------------------------------------------------------------------------------------ main

def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def _spawn(args: argparse.Namespace, model: str, stage: str, mode: str, batch: int) -> dict:
    spec = {"model": model, "stage": stage, "mode": mode, "batch": batch, "steps": args.steps,
            "repeats": args.repeats, "sample_steps": args.sample_steps, "device": args.device,
            "threads": args.threads, "w": args.w, "trainer_steps": args.trainer_steps,
            "num_workers": args.data_workers}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT, check=False)
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
        eager = next((e for e in results if (e["model"], e["stage"], e["mode"]) == (r["model"], r["stage"], eager_mode)), None)
        if eager is None:
            continue
        compile_s = r["first_step_s"] - r["train_step_s"]
        saved = eager["train_step_s"] - r["train_step_s"]
        out.append({"model": r["model"], "stage": r["stage"], "mode": eager_mode, "compile_s": compile_s,
                    "eager_step_s": eager["train_step_s"], "compiled_step_s": r["train_step_s"],
                    "speedup": eager["train_step_s"] / r["train_step_s"],
                    "break_even_steps": compile_s / saved if saved > 0 else None})
    return out


def format_table(results: list[dict], data: dict) -> str:
    head = (f"{'model':9s} {'stage':12s} {'mode':9s} {'bs':>3s} {'params':>7s} {'GF/img':>7s} {'step ms':>8s} "
            f"{'img/s':>7s} {'GF/s':>6s} {'%c32':>5s} {'%c16':>5s} {'%mm32':>5s} {'smp ms':>7s} {'smp GF/s':>8s} "
            f"{'%f32':>5s} {'%f16':>5s} {'MiB':>6s} {'load':>4s} {'data img/s':>10s}")
    lines = [head, "-" * len(head)]
    for r in results:
        c32, c16 = r["ceilings"]["fp32"], r["ceilings"]["bf16"]
        pct = lambda a, b: f"{100 * a / b:5.0f}" if b else "    -"
        smp = r.get("sample_step_s")
        data_ips = data.get(r["stage"]) if r["model"] == "cascade" else None
        lines.append(
            f"{r['model']:9s} {r['stage']:12s} {r['mode']:9s} {r['batch_size']:3d} {r['params'] / 1e6:6.2f}M "
            f"{r['forward_gflops_per_image']:7.3f} {1e3 * r['train_step_s']:8.1f} {r['train_images_per_s']:7.1f} "
            f"{r['train_gflops_per_s']:6.1f} {pct(r['train_gflops_per_s'], c32['conv_fwdbwd_gflops'])} "
            f"{pct(r['train_gflops_per_s'], c16['conv_fwdbwd_gflops'])} "
            f"{pct(r['train_gflops_per_s'], c32['matmul_gflops'])} "
            + (f"{1e3 * smp:7.1f} {r['sample_gflops_per_s']:8.1f} "
               f"{pct(r['sample_gflops_per_s'], c32['conv_fwd_gflops'])} "
               f"{pct(r['sample_gflops_per_s'], c16['conv_fwd_gflops'])} " if smp else f"{'-':>7s} {'-':>8s}     -     - ")
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    parser.add_argument("--data-workers", type=int, default=None, help="loader workers (default: what data.num_workers=auto picks here)")
    parser.add_argument("--no-data", action="store_true", help="skip the data loader measurement")
    parser.add_argument("--compile", action="store_true",
                        help="also run every mode under torch.compile: prints compile time and steady-state gain")
    parser.add_argument("--trainer", action="store_true",
                        help="also train each stage with the trainer (synthetic shards) and compare with the bare step")
    parser.add_argument("--trainer-steps", type=int, default=60, help="steps of each --trainer run (default 60)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 step, 1 repeat, 1 sampling step")
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.data_workers is None:  # the trainer's default (data.num_workers=auto) for this device and thread count
        from cascade.data.workers import resolve_num_workers
        from cascade.training.trainer_config import DataConfig

        if args.threads:
            torch.set_num_threads(args.threads)
        args.data_workers = resolve_num_workers(DataConfig.__dataclass_fields__["num_workers"].default,
                                                torch.device(args.device))
    if args.worker:
        s = json.loads(args.worker)
        if s["model"] == "trainer":
            result = run_trainer(s["stage"], s["mode"], s["batch"], s["trainer_steps"], s["device"], s["threads"],
                                 s["num_workers"])
            print(json.dumps(result))
            return result
        result = run_config(s["model"], s["stage"], s["mode"], s["batch"], s["steps"], s["repeats"],
                            s["sample_steps"], s["device"], s["threads"], s["w"])
        print(json.dumps(result))
        return result
    if args.quick:
        args.steps, args.repeats, args.sample_steps = 1, 1, min(args.sample_steps, 1)
        args.trainer_steps = min(args.trainer_steps, 20)
    names = [s for s in args.stages.split(",") if s]
    for n in names:
        stage_config(n)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        parse_mode(m)
    if args.compile:  # each mode also compiled, to print compile time and steady-state gain side by side
        modes = [v for m in modes for v in ([m] if parse_mode(m)["compile"] else [m, f"{m}+compile"])]
    if args.compare:
        _diffusers()
    batches = {n: args.batch_size or DEFAULT_BATCH[n] for n in names}
    results = []
    for name in names:
        for mode in modes:
            results.append(_spawn(args, "cascade", name, mode, batches[name]))
            print(f"  measured cascade {name} {mode}: {results[-1]['train_images_per_s']:.1f} img/s", flush=True)
            if args.compare and stage_config(name).kind != "classifier":
                results.append(_spawn(args, "diffusers", name, mode, batches[name]))
                ratio = results[-2]["train_images_per_s"] / results[-1]["train_images_per_s"]
                results[-2]["vs_diffusers_train_speedup"] = ratio
                print(f"  measured diffusers {name} {mode}: {results[-1]['train_images_per_s']:.1f} img/s "
                      f"(cascade/diffusers = {ratio:.2f}×, FLOPs ratio "
                      f"{results[-1]['diffusers']['flops_ratio']:.2f})", flush=True)
    compile_report = compile_gains(results)
    for c in compile_report:
        print(f"  compile {c['model']} {c['stage']} {c['mode']}: compile {c['compile_s']:.1f} s, step "
              f"{1e3 * c['eager_step_s']:.1f} → {1e3 * c['compiled_step_s']:.1f} ms ({c['speedup']:.2f}×), "
              + (f"pays off after {c['break_even_steps']:.0f} steps" if c["break_even_steps"] else "never pays off"),
              flush=True)
    trainer = []
    if args.trainer:
        for name in names:
            for mode in modes:
                run = _spawn(args, "trainer", name, mode, batches[name])
                bare = next(r for r in results if r["model"] == "cascade" and r["stage"] == name and r["mode"] == mode)
                run["bare_step_images_per_s"] = bare["train_images_per_s"]
                run["trainer_vs_bare"] = run["trainer_images_per_s"] / bare["train_images_per_s"]
                trainer.append(run)
                print(f"  trainer {name} {mode} ({run['num_workers']} workers): {run['trainer_images_per_s']:.1f} img/s "
                      f"= {100 * run['trainer_vs_bare']:.0f}% of the bare step ({bare['train_images_per_s']:.1f}); "
                      f"whole run {run['wall_images_per_s']:.1f} img/s", flush=True)
    data = {}
    if not args.no_data:
        data = measure_data([n for n in names if n != "big32"], batches, 2 if args.quick else 10, args.data_workers)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": _cpu_name(),
              "torch": torch.__version__, "device": args.device, "logical_cpus": os.cpu_count(),
              "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "results": results,
              "compile": compile_report, "trainer": trainer, "data_loader_images_per_s": data}
    table = format_table(results, data)
    print(f"\n{report['date']}  {report['cpu']}  torch {report['torch']}  {args.device}  "
          f"{sorted({r['threads'] for r in results})} threads  capability {report['cpu_capability']}  "
          f"mkldnn bf16 {report['mkldnn_bf16_supported']}")
    print(table)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
