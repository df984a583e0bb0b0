"""Every command line in tools/ keeps the exit-code convention of cascade.errors: success 0, bad input one line
`<prog>: error: …` on stderr and 2, an interrupt (Ctrl-C) one line and 130 (128 + SIGINT).

Each tool runs as `python tools/<tool>.py` would run it (its `__main__` block, in this process), on inputs that
fail or stop before any real work."""

from __future__ import annotations

import argparse
import runpy
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = sorted(p.stem for p in (ROOT / "tools").glob("*.py"))


def _run(tool: str, argv: list[str], monkeypatch) -> int:
    """The exit code of `python tools/<tool>.py argv`."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "tools" / f"{tool}.py"), *argv])
    try:
        runpy.run_path(str(ROOT / "tools" / f"{tool}.py"), run_name="__main__")
    except SystemExit as exc:
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        return -1  # escaped the tool: Python would print a traceback
    return 0


def test_every_tool_is_covered():
    assert {"make_shards", "train_stage", "sample_cascade", "eval_fid", "sweep", "demo", "bench"} <= set(TOOLS)


@pytest.mark.parametrize("tool", TOOLS)
def test_help_succeeds(tool, monkeypatch, capfd):
    assert _run(tool, ["--help"], monkeypatch) == 0
    assert capfd.readouterr().out


@pytest.mark.parametrize("tool", TOOLS)
def test_a_bad_flag_is_one_line_and_exit_2(tool, monkeypatch, capfd):
    assert _run(tool, ["--no-such-flag"], monkeypatch) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{tool}: error: "), err


@pytest.mark.parametrize("tool", TOOLS)
def test_an_interrupt_is_one_line_and_exit_130(tool, monkeypatch, capfd):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for parse in ("parse_args", "parse_intermixed_args"):  # Ctrl-C while the tool starts
        monkeypatch.setattr(argparse.ArgumentParser, parse, interrupted)
    assert _run(tool, [], monkeypatch) == 128 + signal.SIGINT
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{tool}: ") and "Traceback" not in err[0], err


@pytest.mark.parametrize("tool, argv, message", [
    ("make_shards", ["--source", "synthetic", "--out", "o", "--val-fraction", "1"],
     "argument --val-fraction: must be a number in [0, 1), got '1'"),
    ("sample_cascade", ["--classes", "1", "--num-per-class", "0"], "argument --num-per-class: must be an integer >= 1"),
    ("sample_cascade", ["--classes", "1", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    ("eval_fid", ["--data", "d", "--num-samples", "1"], "argument --num-samples: must be an integer >= 2"),
    ("sweep", ["--data", "d", "--seed", "-1"], "argument --seed: must be an integer >= 0"),
])
def test_bad_values_name_the_flag_as_typed(tool, argv, message, monkeypatch, capfd):
    assert _run(tool, argv, monkeypatch) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{tool}: error: {message}"), err
