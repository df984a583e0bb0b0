"""The full-disk drill: at every write site a full disk gives one line naming the disk, its free space and the fix,
leaves none of the writer's temporary files, and a rerun once there is room finishes.

The disk is filled by injection (ENOSPC from every write to a file under a chosen folder, as a real full disk
answers: files and folders can still be created, their bytes cannot be written), so the drill runs anywhere,
without root or a tmpfs mount."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from cascade.atomic import write_atomic, write_atomic_with
from cascade.checkpoint import latest_checkpoint, load_training_state, save_checkpoint
from cascade.errors import OutputNotWritable, cli_main, describe_failure, ensure_writable_dir
from cascade.imageops import save_png
from cascade.training.metrics_log import MetricsLog

ROOT = Path(__file__).resolve().parents[1]


class _FullFile:
    """A file opened for writing on the full disk: opening worked, writing its bytes fails."""

    def __init__(self, real):
        self._real = real

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._real.close()


@pytest.fixture
def full_disk(monkeypatch):
    """``fill(folder, suffix="")``: from now on every write to a file under ``folder`` (whose name ends with
    ``suffix``) fails with ENOSPC; ``fill(None)`` frees the disk again."""
    full: list[Path] = []
    suffixes: list[str] = [""]
    fds: set[int] = set()
    real_open, real_os_open, real_write = builtins.open, os.open, os.write

    def on_full_disk(path) -> bool:
        return (isinstance(path, (str, os.PathLike)) and str(path).endswith(suffixes[0])
                and any(Path(path).absolute().is_relative_to(f) for f in full))

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return _FullFile(handle) if on_full_disk(file) and set(mode) & set("wax+") else handle

    def fake_os_open(path, flags, *args, **kwargs):
        fd = real_os_open(path, flags, *args, **kwargs)
        if on_full_disk(path) and flags & (os.O_WRONLY | os.O_RDWR):
            fds.add(fd)
        return fd

    def fake_write(fd, data):
        if fd in fds:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    for module, name, fake in ((builtins, "open", fake_open), (io, "open", fake_open), (os, "open", fake_os_open),
                               (os, "write", fake_write)):
        monkeypatch.setattr(module, name, fake)

    def fill(folder, suffix: str = ""):
        full.clear()
        fds.clear()
        suffixes[0] = suffix
        if folder is not None:
            full.append(Path(folder).absolute())

    return fill


def _hidden(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp" in p.name)


def _weights():
    return {"model": {"w": torch.arange(6.0)}, "ema": {"w": torch.ones(6)}}


def test_the_one_line_names_the_file_the_disk_its_free_space_and_the_fix(tmp_path, capsys):
    err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "missing" / "file.bin"))
    line = describe_failure(err)
    assert str(tmp_path / "missing" / "file.bin") in line and f"({tmp_path}: " in line and " free of " in line
    assert "free space there or choose another folder, then run the same command again" in line
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path))
    assert "the disk ran out of space" in describe_failure(quota)
    assert "read-only" in describe_failure(OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path)))

    def fails():
        raise err

    assert cli_main("tool")(fails)() == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tool: error: [Errno 28]")


def test_checkpoint_on_a_full_disk_leaves_the_earlier_one_and_a_rerun_saves(tmp_path, full_disk):
    run = tmp_path / "run"
    config = {"stage": {"name": "toy"}}
    save_checkpoint(run, 1, weights=_weights(), training_state={"step": 1}, config=config)
    full_disk(run)
    with pytest.raises(OSError) as caught:
        save_checkpoint(run, 2, weights=_weights(), training_state={"step": 2}, config=config)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(run / "checkpoints" / "step-00000002")
    assert _hidden(run) == [] and sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest",
                                                                                             "step-00000001"]
    assert latest_checkpoint(run).name == "step-00000001" and load_training_state(run)["step"] == 1
    full_disk(None)
    assert save_checkpoint(run, 2, weights=_weights(), training_state={"step": 2}, config=config).is_dir()
    assert load_training_state(run)["step"] == 2 and _hidden(run) == []


def test_metrics_log_atomic_files_and_pngs_leave_no_partial_file(tmp_path, full_disk):
    log = MetricsLog(tmp_path / "metrics.jsonl", resume_step=None)
    log.write({"step": 1, "loss": 0.5})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    full_disk(tmp_path)
    with pytest.raises(OSError, match="No space left") as caught:
        log.write({"step": 2, "loss": 0.25})
    assert caught.value.filename == str(tmp_path / "metrics.jsonl")
    assert (tmp_path / "metrics.jsonl").read_bytes() == before  # no cut-off record
    with pytest.raises(OSError) as caught:
        write_atomic(tmp_path / "report.md", "# report\n")
    assert caught.value.filename == str(tmp_path / "report.md")
    grid = Image.new("RGB", (8, 8))
    with pytest.raises(OSError):  # the trainer's sample grids are written this way
        write_atomic_with(tmp_path / "grid.png", lambda f: grid.save(f, format="PNG"))
    from cascade.evaluation.plots import plot_training_curves, write_pairs_image

    with pytest.raises(OSError):  # the evaluation's plots and image grids
        plot_training_curves({"base32": tmp_path}, tmp_path / "curves.png")  # its metrics.jsonl above
    with pytest.raises(OSError):
        write_pairs_image(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), tmp_path / "pairs.png")
    with pytest.raises(OSError) as caught:  # the demo's and the quality benchmark's grids
        save_png(grid, tmp_path / "demo-grid.png")
    assert caught.value.filename == str(tmp_path / "demo-grid.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    full_disk(None)
    log.write({"step": 2, "loss": 0.25})
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_make_shards_on_a_full_disk_one_line_no_temporary_shard_and_a_clean_rerun(tmp_path, full_disk, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_shards_full_disk", ROOT / "tools" / "make_shards.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "shards"
    argv = ["--source", "synthetic", "--out", str(out), "--images-per-class", "3", "--num-classes", "2",
            "--max-res", "32", "--shard-size", "2", "--no-progress"]
    full_disk(out, suffix=".tar.tmp")  # the shards themselves hit the full disk
    try:
        code = tool.main(argv)
    except SystemExit as stop:
        code = stop.code
    lines = ([] if isinstance(code, int) else [code]) + capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines  # no "Exception ignored" from the tar stream's finaliser
    assert lines[0].startswith(f"make_shards: error: [Errno 28] No space left on device: '{out}/train-000000.tar'")
    assert "free space there or choose another folder" in lines[0]
    assert not list(out.glob("*.tar")) and _hidden(out) == []
    full_disk(None)
    info = tool.main(argv)
    assert info["counts"]["train"]["total"] + info["counts"]["val"]["total"] == 6 and _hidden(out) == []


def test_a_run_dir_on_a_full_disk_is_refused_before_any_work(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2 << 20, 2 << 20, 0))
    with pytest.raises(OutputNotWritable, match=r"^run_dir .*run: the disk is full \(.*0 bytes free of 2.0 MiB\)"):
        ensure_writable_dir(tmp_path / "run", "run_dir")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_training_on_a_full_disk_stops_with_one_line_and_a_rerun_resumes(synthetic_shards, tmp_path, full_disk):
    """The drill end to end: the second checkpoint hits the full disk; the run stops with the error, without its
    temporary folder; once there is room, the same run resumes from the first checkpoint and finishes."""
    from conftest import SHARD_CLASSES, tiny_run_config

    from cascade.training.trainer import train_stage
    from stages import get_stage

    run = tmp_path / "run"
    stage = get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    config = tiny_run_config(run, synthetic_shards, max_steps=2, ckpt_every=1, sample_every=0)
    real_save = save_checkpoint

    def save_then_fill(run_dir, step, **kwargs):
        if step == 2:
            full_disk(run)
        return real_save(run_dir, step, **kwargs)

    import cascade.checkpoint

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cascade.checkpoint, "save_checkpoint", save_then_fill)
        with pytest.raises(OSError) as caught:
            train_stage(stage, config)
    assert caught.value.errno == errno.ENOSPC and "the disk ran out of space" in describe_failure(caught.value)
    assert latest_checkpoint(run).name == "step-00000001" and _hidden(run) == []
    full_disk(None)
    final = train_stage(stage, config)
    assert Path(final).name == "step-00000002" == latest_checkpoint(run).name and _hidden(run) == []
