"""GPU checks (marker ``gpu``; skipped where CUDA is unavailable): the trainer in bf16 + channels_last on CUDA,
sampling on CUDA in both precisions, attention kernels on CUDA. `tools/gpu_check.sh` runs them on a GPU day."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHARD_CLASSES, tiny_run_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_trainer_bf16_channels_last_on_cuda(synthetic_shards, tmp_path):
    import stages
    from cascade.training.trainer import StageTrainer

    stage = stages.get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    trainer = StageTrainer(stage, tiny_run_config(tmp_path / "run", synthetic_shards, mixed_precision="bf16",
                                                  channels_last=True, max_steps=4, warmup_steps=1))
    assert trainer.device.type == "cuda" and trainer.mixed_precision == "bf16"
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.run()
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.ndim == 4)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and records[-1]["nan_skips"] == 0
    assert all(r["loss"] == r["loss"] and r["loss"] < float("inf") for r in records)


def test_sampling_on_cuda_bf16_agrees_with_fp32(tiny_runs):
    from cascade.pipeline.cascade_pipeline import CascadePipeline

    runs_root, chain = Path(tiny_runs["base32"]).parent, ("base32", "sr64")
    out = {p: CascadePipeline.from_runs(runs_root, chain, device="cuda", precision=p)(
        [0, 2], steps=4, sampler="ddim", eta=0.0, w=2.0, seed=7, progress=False) for p in ("fp32", "bf16")}
    assert out["fp32"]["sr64"].shape == (2, 3, 64, 64)
    for stage in chain:
        assert torch.isfinite(out["bf16"][stage]).all()
        diff = (out["bf16"][stage] - out["fp32"][stage]).abs()
        assert diff.mean() < 5e-3, (stage, float(diff.mean()))
    auto = CascadePipeline.from_runs(runs_root, ("base32",), device="cuda", precision="auto")
    assert auto.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")


@pytest.mark.parametrize("tokens", [64, 1024])
def test_attention_on_cuda_matches_explicit(tokens):
    from cascade.nets.attention import attention, explicit_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, tokens, 2, 32, generator=gen) for _ in range(3))
    out = attention(*(t.cuda().bfloat16() for t in (q, k, v)))
    assert out.dtype == torch.bfloat16 and out.is_cuda
    torch.testing.assert_close(out.float().cpu(), explicit_attention(q, k, v), atol=3e-2, rtol=3e-2)
