"""Session fixtures shared by the test modules: a tiny synthetic shard set and tiny trained runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARD_CLASSES = 3
# A few optimizer steps of every stage at size=tiny: enough to write real checkpoints, cheap on CPU.
TINY_TRAINER = {"max_steps": 3, "batch_size": 2, "warmup_steps": 2, "ckpt_every": 2, "log_every": 1,
                "sample_every": 0, "eval_every": 0, "ema_sigma_rels": (), "run_report": False,
                "mixed_precision": "no", "progress": False}
TINY_BF16_STAGE, TINY_BF16_STAGE_PRECISION = "sr64", "bf16"


def one_line(stderr: str) -> str:
    """The one line a failure or a stop prints, besides a run's own output (`is_run_output`) and a tool's start-up
    summary (its title: the line before indented rows); asserts there is exactly one and no traceback."""
    from cascade.training.progress import is_run_output

    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    lines = [ln for ln, after in zip(lines, [*lines[1:], ""]) if not is_run_output(ln) and not after.startswith("  ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def load_tool(name: str):
    """The module of `tools/<name>.py`, imported from its file (the tools are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """A shard folder (train-*.tar, val-*.tar, dataset.json) with all resolutions 32..256:
    3 classes × 6 synthetic images, 12 train (3 shards of 4) and 6 val."""
    from cascade.data.shards import write_shards
    from cascade.data.sources import SyntheticSource

    out = tmp_path_factory.mktemp("shards")
    write_shards(SyntheticSource(num_classes=SHARD_CLASSES, images_per_class=6, seed=0), out, shard_size=4,
                 val_fraction=0.25, max_res=256)
    return out


def tiny_run_config(run_dir: Path, shards: Path, seed: int = 0, **trainer):
    """A RunConfig for a quick CPU run on the synthetic shards (trainer keys override TINY_TRAINER)."""
    from cascade.training.trainer_config import DataConfig, RunConfig, TrainerConfig

    return RunConfig(run_dir=str(run_dir), seed=seed, resume="auto",
                     data=DataConfig(root=str(shards), num_workers=0, shuffle_buffer=8),
                     trainer=TrainerConfig(**{**TINY_TRAINER, **trainer}))


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, synthetic_shards) -> dict[str, Path]:
    """Every stage trained at size=tiny for a few steps; {stage name: run dir} laid out as <runs>/<stage>/."""
    import stages
    from cascade.training.trainer import train_stage

    runs = tmp_path_factory.mktemp("runs")
    out = {}
    for name in stages.STAGE_NAMES:
        stage = stages.get_stage(name, "tiny", num_classes=SHARD_CLASSES)
        # One stage in bf16 autocast, the others in full precision, in one process: the suite takes both
        # precision paths on every CPU (bf16 runs everywhere, natively or emulated) and changes between them.
        precision = TINY_BF16_STAGE_PRECISION if name == TINY_BF16_STAGE else "no"
        train_stage(stage, tiny_run_config(runs / name, synthetic_shards, mixed_precision=precision),
                    extra_config={"size": "tiny"})
        out[name] = runs / name
    return out


@pytest.fixture(scope="session")
def runs_root(tiny_runs) -> Path:
    """The runs folder holding the tiny trained stages as <stage>/ run dirs."""
    return Path(tiny_runs["base32"]).parent


@pytest.fixture
def one_thread():
    """Tiny, latency-bound tensors: one intra-op thread avoids OpenMP oversubscription when other
    processes share the 2 cores (several threads can then be many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
