"""cascade.locks: one writer per folder. A second writer is refused in one line naming the owner, a lock left by a
killed owner is taken over with a warning, and the trainer and train_stage hold the run_dir's lock."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARD_CLASSES, tiny_run_config

from cascade.locks import LOCK_NAME, FolderLock, FolderLocked

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_writer_is_refused_naming_the_owner(tmp_path):
    with FolderLock(tmp_path / "out", "--out"):
        owner = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(FolderLocked) as err:
            FolderLock(tmp_path / "out", "--out").acquire()
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"--out {tmp_path / 'out'} is in use by another run")
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
        with pytest.raises(FolderLocked):
            FolderLock(tmp_path / "out", "--out").check_free()
    assert not (tmp_path / "out").exists()  # created by the lock, empty again: removed with it
    FolderLock(tmp_path / "out", "--out").check_free()  # free again, and the check creates nothing
    assert not (tmp_path / "out").exists()


def test_a_folder_with_files_keeps_them_and_loses_only_the_lock_file(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with FolderLock(tmp_path, "run_dir") as lock:
        assert lock.held and (tmp_path / LOCK_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_a_disabled_lock_holds_nothing(tmp_path):
    with FolderLock(tmp_path, "run_dir"), FolderLock(tmp_path, "run_dir", enabled=False) as other:
        assert not other.held  # a non-zero rank of a multi-process run: the main process holds it


def test_a_lock_left_by_a_killed_owner_is_taken_over_with_a_warning(tmp_path, capsys):
    code = ("import os, signal, sys; from cascade.locks import FolderLock; "
            "FolderLock(sys.argv[1], '--out').acquire(); print(os.getpid(), flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == -9
    dead = int(done.stdout)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == dead  # the lock file stays behind
    with FolderLock(tmp_path, "--out"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("warning: --out") and f"taking over the lock left by pid {dead} " in warning
    assert "\n" not in warning and not (tmp_path / LOCK_NAME).exists()


def test_a_forked_child_outliving_a_killed_owner_does_not_keep_the_lock(tmp_path, capsys):
    # A data-loader worker forked by the trainer can outlive its killed parent for a moment.
    code = ("import os, signal, sys, time; from cascade.locks import FolderLock; "
            "FolderLock(sys.argv[1], '--out').acquire(); child = os.fork(); "
            "time.sleep(60) if child == 0 else (print(child, flush=True), os.kill(os.getpid(), signal.SIGKILL))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    proc.stdout.close()  # the child keeps its end open: read no further
    assert proc.wait(timeout=60) == -9
    try:
        with FolderLock(tmp_path, "--out"):
            pass
        assert "taking over the lock left by pid" in capsys.readouterr().err
    finally:
        os.kill(child, 9)


def test_two_trainers_on_one_run_dir_the_second_is_refused_before_writing(tmp_path, synthetic_shards):
    import stages
    from cascade.training.trainer import StageTrainer

    stage = stages.get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    run_dir = tmp_path / "run"
    first = StageTrainer(stage, tiny_run_config(run_dir, synthetic_shards))
    try:
        with pytest.raises(FolderLocked, match=r"^run_dir .* is in use by another run \(pid \d+"):
            StageTrainer(stage, tiny_run_config(run_dir, synthetic_shards))
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # nothing written by either yet
        # The command line: one line, exit code 2, before hydra writes its logs into run_dir.
        env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "CASCADE_DEBUG")}
        done = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "train_stage.py"), "stage=base32", "size=tiny",
             f"data.root={synthetic_shards}", f"run_dir={run_dir}", "data.num_workers=0"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"train_stage: error: run_dir {run_dir} is in use"), lines
        assert f"pid {os.getpid()}" in lines[0]
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]
    finally:
        first.close()
    assert not run_dir.exists() or LOCK_NAME not in {p.name for p in run_dir.iterdir()}


@pytest.mark.parametrize("tool, args", [
    ("eval_fid", ["--data", "shards", "--device", "cpu"]),
    ("sweep", ["--data", "shards", "--device", "cpu"]),
    ("make_shards", ["--source", "synthetic", "--images-per-class", "1", "--num-classes", "1", "--max-res", "32"]),
    ("demo", ["--quick"]),
    ("sample_cascade", ["--classes", "0"]),
    ("quality_bench", ["--stage", "base32", "--data", "shards", "--quick"]),
])
def test_every_tool_writing_a_folder_refuses_a_second_writer(tool, args, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(f"{tool}_tool", ROOT / "tools" / f"{tool}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    with FolderLock(out, "--out"):
        assert module.main([*args, "--out", str(out)]) == 2
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{tool}: error: --out {out} is in use by another run (pid {os.getpid()} on host "), err
    assert "\n" not in err and err.endswith("; wait for it to finish or choose another --out"), err
