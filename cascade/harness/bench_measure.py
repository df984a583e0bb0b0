"""One benchmark measurement, in this process: a network's training step, sampling step and ceilings, the
trainer's throughput, or the loader's.

Training is timed through the library's own step (`cascade.training.step.TrainStep`: autocast, loss, backward,
clipping, fused AdamW, LR schedule, EMA update), on one batch held on the device: the "bare step". The conv and
matmul ceilings are measured with the network's dominant 3×3 conv shape (its largest total-FLOP conv at the
stated batch size) and the same conv as an im2col GEMM, fp32 and bf16. Training FLOP/s counts forward +
backward as 3× the forward FLOPs (FlopCounterMode).

`cascade.harness.bench` runs each measurement in its own process (``python -m cascade.harness.bench_measure
SPEC``, SPEC a JSON object; the result is the last line of stdout) so that its peak memory is its own.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from cascade.config import StageConfig
from cascade.data.loader import make_stage_loader
from cascade.diffusion.guidance import classifier_free_guidance
from cascade.diffusion.samplers import sample_ddim
from cascade.harness.bench_diffusers import count_flops, matched_diffusers
from cascade.harness.bench_profile import profile_step
from cascade.nets.build import build_diffusion, build_model, count_parameters, example_inputs, forward_flops
from cascade.training.losses import example_batch, make_stage_loss
from cascade.training.runtime import make_accelerator
from cascade.training.step import new_window, standalone_train_step
from cascade.training.timestep_sampler import UniformSampler
from cascade.training.trainer_config import TrainerConfig

MODE_TOKENS = ("fp32", "bf16", "cl", "compile")


def parse_mode(mode: str) -> dict:
    """``bf16+cl`` → which of bf16 autocast, channels_last and torch.compile a mode turns on."""
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


# ------------------------------------------------------------------------------------------ ceilings

def dominant_conv(model: nn.Module, inputs: dict) -> dict:
    """The 3×3 conv shape holding the most forward FLOPs in one forward pass (batch 1)."""
    totals: dict[tuple, int] = {}
    hooks = []

    def hook(mod, args, out):
        x = args[0]
        key = (mod.in_channels, mod.out_channels, mod.kernel_size[0], x.shape[-2], x.shape[-1])
        flops = (2 * mod.in_channels * mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1]
                 * out.shape[-2] * out.shape[-1])
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


# ------------------------------------------------------------------------------------------ one network

def measure_network(model_name: str, stage_name: str, cfg: StageConfig, mode: str, batch: int, steps: int,
                    repeats: int, sample_steps: int, device_name: str, threads: int | None, w: float,
                    profile: int = 0, num_workers: int = 0) -> dict:
    """Measure one (network, mode): ``model_name`` "cascade" (the stage's own network) or "diffusers" (its
    FLOP-matched UNet2DModel); returns a JSON-able dict. ``profile`` > 0: also that many training steps (each
    fetching its batch from the stage's loader with ``num_workers`` workers, as a run does) and one guided sampling
    run under ``torch.profiler``, by kind (`cascade.harness.bench_profile`)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    opts = parse_mode(mode)
    torch.manual_seed(0)
    ours = build_model(cfg)
    ours_flops = forward_flops(cfg, ours)
    extra = {}
    if model_name == "diffusers":
        model, extra = matched_diffusers(cfg, ours_flops)
        flops = count_flops(model, example_inputs(cfg, 1))
    else:
        model, flops = ours, ours_flops
    del ours
    model.to(device)
    shape = dominant_conv(model, example_inputs(cfg, 1, device))
    shape["share_of_forward"] /= flops
    ceilings = measure_ceilings(shape, batch, device, repeats)
    if opts["channels_last"]:
        model.to(memory_format=torch.channels_last)
    diffusion = build_diffusion(cfg)
    sampler = UniformSampler(diffusion.num_timesteps)
    fmt = torch.channels_last if opts["channels_last"] else torch.contiguous_format
    batch_data = {k: (v.contiguous(memory_format=fmt) if v.ndim == 4 else v)
                  for k, v in example_batch(cfg, batch, device=device).items()}
    # The trainer's own step with the trainer's defaults: accelerate's autocast, fused AdamW, clipping, the
    # non-finite skip, the LR schedule and the EMA update.
    tcfg = TrainerConfig(batch_size=batch, mixed_precision="bf16" if opts["bf16"] else "no")
    acc = make_accelerator(tcfg.mixed_precision, cpu=device.type == "cpu")
    step, _ = standalone_train_step(acc, model, make_stage_loss(cfg, diffusion, sampler, tcfg.p_uncond),
                                    sampler, tcfg, device, mixed_precision=tcfg.mixed_precision,
                                    compile=opts["compile"])
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
        "threads": torch.get_num_threads(), "batch_size": batch, "params": count_parameters(model),
        "forward_gflops_per_image": flops / 1e9, "dominant_conv": shape, "ceilings": ceilings,
        "train_step_s": step_s, "train_images_per_s": batch / step_s, "first_step_s": first_step_s,
        "train_gflops_per_s": 3 * flops * batch / step_s / 1e9, **({"diffusers": extra} if extra else {}),
    }
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # ru_maxrss is in KiB on Linux: the training steps' growth of the process's peak resident set
        result["peak_memory_mib"] = rss_peak / 1024
        result["train_memory_growth_mib"] = (rss_peak - rss_before) / 1024
    sampling = (guided_sampling(runner, diffusion, cfg, batch_data, batch, device, opts["bf16"], w, sample_steps)
                if cfg.kind != "classifier" and sample_steps > 0 else None)
    if sampling:
        sample, num_steps = sampling
        model.eval()
        per_step = _time(sample, device, 1, repeats, warmup=1) / num_steps
        result.update({"sample_steps": num_steps, "sample_step_s": per_step,
                       "sample_images_per_s_per_step": batch / per_step,
                       "sample_gflops_per_s": 2 * flops * batch / per_step / 1e9})  # CFG: 2 forwards per image
    if profile:
        result["profile"] = profile_network(step, cfg, batch, device, opts, sampling, profile, num_workers)
    result["loadavg_1m"] = [load_before, os.getloadavg()[0]]
    return result


def guided_sampling(runner, diffusion, cfg: StageConfig, batch_data: dict, batch: int, device: torch.device,
                    bf16: bool, w: float, sample_steps: int):
    """(sample, steps): a call running ``sample_steps`` DDIM steps with batched classifier-free guidance (weight
    ``w``) on ``batch`` images of the stage (SR inputs from ``batch_data``, level 0.1), under bf16 autocast if asked."""
    guided = classifier_free_guidance(runner, w, cfg.num_classes)
    respaced = diffusion.respace(f"ddim{sample_steps}")
    kwargs = {"y": batch_data["y"]}
    if cfg.low_resolution:
        kwargs.update(x_low=batch_data["x_low"], aug_level=torch.full((batch,), 0.1, device=device))
    shape_x = (batch, 3, cfg.resolution, cfg.resolution)

    def sample():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            sample_ddim(guided, respaced, shape_x, model_kwargs=kwargs)

    return sample, respaced.num_timesteps


def profile_network(step, cfg: StageConfig, batch: int, device: torch.device, opts: dict, sampling, steps: int,
                    num_workers: int) -> dict:
    """{"train": ..., "sample": ...}: `profile_step` of ``steps`` training steps, each fetching its batch from the
    stage's loader over a temporary synthetic shard set (labelled "data"), and, given ``sampling`` (`guided_sampling`'s
    pair), of one guided DDIM sampling run, per sampling step."""
    from torch.profiler import record_function

    from cascade.data.shards import write_shards
    from cascade.data.sources import SyntheticSource

    fmt = torch.channels_last if opts["channels_last"] else torch.contiguous_format
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(SyntheticSource(num_classes=cfg.num_classes, images_per_class=max(4, 4 * batch // 10)), tmp,
                     shard_size=50, val_fraction=0.0, max_res=cfg.resolution)
        loader = make_stage_loader(tmp, split="train", resolution=cfg.resolution, low_resolution=cfg.low_resolution,
                                   batch_size=batch, num_workers=num_workers, epoch_length=10**6)
        batches, window = {"iterator": iter(loader)}, new_window(device)

        def train_step():
            with record_function("cascade::data"):
                fetched = {k: v.to(device, non_blocking=True) for k, v in next(batches["iterator"]).items()}
                fetched = {k: (v.contiguous(memory_format=fmt) if v.ndim == 4 else v) for k, v in fetched.items()}
            step([fetched], window)

        step.model.train()
        out["train"] = profile_step(train_step, steps, lambda: _sync(device))
        batches.clear()  # the loader's workers end before the shards go
    if sampling:
        sample, n = sampling
        step.model.eval()
        run = profile_step(sample, 1, lambda: _sync(device))
        out["sample"] = {"profiled_ms": run["profiled_ms"] / n, "kinds": {k: v / n for k, v in run["kinds"].items()}}
    return out


# ------------------------------------------------------------------------------------------ the trainer

def measure_trainer(stage_name: str, cfg: StageConfig, mode: str, batch: int, steps: int, device_name: str,
                    threads: int | None, num_workers: int) -> dict:
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
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(SyntheticSource(num_classes=cfg.num_classes, images_per_class=40), f"{tmp}/data",
                     shard_size=50, val_fraction=0.1, max_res=cfg.resolution)
        trainer_cfg = TrainerConfig(max_steps=steps, batch_size=batch, warmup_steps=100, ema_decay=0.999,
                                    log_every=10, ckpt_every=0, sample_every=0, eval_every=0, run_report=False,
                                    progress=False,
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


# ------------------------------------------------------------------------------------------ the loader

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


# ------------------------------------------------------------------------------------------ one process each

def measure(spec: dict) -> dict:
    """One measurement from its JSON spec (written by `cascade.harness.bench`)."""
    cfg = StageConfig.from_dict(spec["config"])
    if spec["model"] == "trainer":
        return measure_trainer(spec["stage"], cfg, spec["mode"], spec["batch"], spec["trainer_steps"], spec["device"],
                               spec["threads"], spec["num_workers"])
    return measure_network(spec["model"], spec["stage"], cfg, spec["mode"], spec["batch"], spec["steps"],
                           spec["repeats"], spec["sample_steps"], spec["device"], spec["threads"], spec["w"],
                           spec.get("profile", 0), spec["num_workers"])


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
