"""Kill -9 and preemption drill: signal a tiny training run and make_shards at random moments; check that nothing
breaks.

    python tools/fault_drill.py                       # 20 training kills, 20 make_shards kills
    python tools/fault_drill.py --kills 5 --shard-kills 5 --work /tmp/drill
    python tools/fault_drill.py --signal TERM         # preemption: 20 SIGTERMs to each (USR1 works the same)

Training: a reference run of a tiny base32 stage goes uninterrupted; another run of the same command is
killed with SIGKILL again and again (at a random moment after launch, or the instant a checkpoint's
temporary folder appears, i.e. while a checkpoint is being written), and relaunched each time. After every
kill each checkpoint the run folder shows must read back whole; every relaunch must resume from the newest
one; at the end the per-step losses (and lr, gradient norms) and the EMA weights must equal the
reference's. make_shards: each kill must leave no shard that differs from the reference's shard of that name
and no dataset.json until the dataset is complete; rerunning the same command (no --overwrite) must give
byte-identical files. Prints a tally such as "training: 20/20 resumed, losses equal" and exits 1 if any
check failed. Every process it kills is one it started.

With --signal TERM (or USR1) each signal falls at a random moment of training (after the launch's first
step) or the instant a checkpoint is being written, and each interrupted run must also exit with 128 + the
signal printing one line, `train_stage: interrupted by SIGTERM at step N; ...`, with the newest checkpoint at
that step N, from which the relaunch resumes. make_shards must exit the same way (or, signalled before its
handler is installed, die by the signal with nothing written). The tally then reads e.g. "training: 20/20
resumed after SIGTERM, 20/20 checkpoints at the signal's step, losses equal".
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cascade import checkpoint
from cascade.cli import OneLineArgumentParser
from cascade.errors import cli_main
from cascade.training.progress import is_run_output

TRAIN_TOOL = ROOT / "tools" / "train_stage.py"
SHARDS_TOOL = ROOT / "tools" / "make_shards.py"
COMPARED = ("loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "grad_norm", "lr", "nan_skips")
RESUMED_RE = re.compile(r"resuming \S+ from (\S+) \(step (\d+)\)")
STOPPED_RE = re.compile(r"^train_stage: interrupted by (\w+)(?: at step (\d+))?[;,]")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "CASCADE_DEBUG")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, flush=True)


# ----------------------------------------------------------------------------------------------- training

@dataclass
class TrainDrillResult:
    kills: int = 0
    resumed: int = 0
    during_checkpoint_write: int = 0
    losses_equal: bool = False
    weights_equal: bool = False
    damaged_seen: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    signal: int = signal.SIGKILL
    at_signal_step: int = 0  # graceful signals: runs whose newest checkpoint is the step the line names

    def tally(self) -> str:
        equal = "losses equal" if self.losses_equal and self.weights_equal else "LOSSES DIFFER"
        half = ("no half-written checkpoint seen" if not self.damaged_seen
                else f"{len(self.damaged_seen)} HALF-WRITTEN CHECKPOINTS SEEN")
        if self.signal == signal.SIGKILL:
            return (f"training: {self.resumed}/{self.kills} resumed, {equal} ({self.during_checkpoint_write} kills "
                    f"while a checkpoint was being written; {half})")
        name = signal.Signals(self.signal).name
        return (f"training: {self.resumed}/{self.kills} resumed after {name}, {self.at_signal_step}/{self.kills} "
                f"checkpoints at the signal's step, {equal} ({self.during_checkpoint_write} signals while a "
                f"checkpoint was being written; {half})")

    @property
    def ok(self) -> bool:
        graceful = self.signal == signal.SIGKILL or self.at_signal_step == self.kills
        return (self.resumed == self.kills and self.losses_equal and self.weights_equal and not self.damaged_seen
                and not self.problems and graceful)


def _train_command(shards: Path, run_dir: Path, max_steps: int, ckpt_every: int) -> list[str]:
    trainer = {"max_steps": max_steps, "ckpt_every": ckpt_every, "batch_size": 2, "log_every": 1,
               "sample_every": 0, "eval_every": 0, "warmup_steps": 2, "progress": "false", "mixed_precision": "no",
               "keep_last": 2}
    return ([sys.executable, str(TRAIN_TOOL), "stage=base32", "size=tiny", f"data.root={shards}",
             f"run_dir={run_dir}", "data.num_workers=0", "data.shuffle_buffer=8", "seed=3"]
            + [f"trainer.{k}={v}" for k, v in trainer.items()])


def _records(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["step"] in out:
            raise ValueError(f"step {record['step']} logged twice in {run_dir / 'metrics.jsonl'}")
        out[record["step"]] = record
    return out


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)


def _checkpoint_writing(run_dir: Path) -> bool:
    root = run_dir / checkpoint.CHECKPOINTS_DIR
    try:
        return any(name.startswith(".step-") and ".tmp-" in name for name in os.listdir(root))
    except FileNotFoundError:
        return False


def _visible_checkpoints_readable(run_dir: Path, result: TrainDrillResult) -> int | None:
    """Reads back every checkpoint the run folder shows; returns the newest step (None if none)."""
    for path in checkpoint.list_checkpoints(run_dir / checkpoint.CHECKPOINTS_DIR):
        try:
            checkpoint.verify_checkpoint(path)
        except checkpoint.CheckpointError as err:
            result.damaged_seen.append(f"{path}: {err}")
    latest = checkpoint.latest_checkpoint(run_dir)
    return None if latest is None else checkpoint.load_config(latest)["step"]


def _metrics_lines(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_bytes().splitlines())
    except FileNotFoundError:
        return 0


def _check_graceful_stop(run_dir: Path, returncode: int, stderr: str, sig: int, result: TrainDrillResult,
                         newest: int | None, max_steps: int) -> None:
    """A graceful signal's run: exit 128 + signal, one line naming it (besides a resume notice), the newest
    checkpoint at the step that line names; or, signalled from the last step's checkpoint on, finished."""
    lines = [line for line in stderr.splitlines()
             if line.strip() and not RESUMED_RE.search(line) and not is_run_output(line)]
    if returncode in (0, -sig) and not lines and newest == max_steps:
        # the signal fell on the final checkpoint's write (the run finished: 0) or after it, while the finished
        # process was exiting (the signal's default action: -sig); either way the run was complete
        result.at_signal_step += 1
        return
    match = STOPPED_RE.match(lines[-1]) if len(lines) == 1 else None
    if returncode != 128 + sig or match is None or match.group(1) != signal.Signals(sig).name:
        result.problems.append(f"{run_dir}: exit {returncode}, stderr {lines!r}")
    elif match.group(2) is None or int(match.group(2)) == newest:
        result.at_signal_step += 1  # stopped outside the loop (after its final checkpoint): nothing to save
    else:
        result.problems.append(f"{run_dir}: stopped at step {match.group(2)}, newest checkpoint {newest}")


def train_drill(work: Path, shards: Path, kills: int, rng: random.Random, *, max_steps: int = 16,
                ckpt_every: int = 2, quiet: bool = False, sig: int = signal.SIGKILL) -> TrainDrillResult:
    """The training half of the drill (see the module docstring); ``sig`` is the signal sent."""
    import torch

    result = TrainDrillResult(signal=sig)
    ref = work / "train-ref"
    start = time.monotonic()
    done = subprocess.Popen(_train_command(shards, ref, max_steps, ckpt_every), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while done.poll() is None and not _metrics_lines(ref):
        time.sleep(0.005)
    first_step = time.monotonic()
    _, ref_err = done.communicate()
    duration, training = time.monotonic() - start, time.monotonic() - first_step  # launch to end; first step on
    if done.returncode != 0:
        result.problems.append(f"reference run failed: {ref_err.strip().splitlines()[-1:]}")
        return result
    _log(f"reference run: {max_steps} steps in {duration:.1f} s", quiet)
    want = _records(ref)

    round_index = 0
    while True:
        run_dir = work / f"train-killed-{round_index}"
        round_index += 1
        expected_resume = None  # step of the newest complete checkpoint before a launch
        while True:
            command = _train_command(shards, run_dir, max_steps, ckpt_every)
            err_path = run_dir.parent / f"{run_dir.name}.stderr"
            with open(err_path, "w") as err_file:
                proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=err_file)
            killed = False
            if result.kills < kills:
                # half the kills wait for a checkpoint's temporary folder (killing mid-write); the others,
                # and those that see no write in time, fall at a random moment before the run would end
                during_write = rng.random() < 0.5
                if sig != signal.SIGKILL:  # graceful: a moment of training, once this launch took a step
                    logged = _metrics_lines(run_dir)
                    while proc.poll() is None and _metrics_lines(run_dir) <= logged:
                        time.sleep(0.005)
                deadline = time.monotonic() + (rng.uniform(0.3, 0.9) * duration if sig == signal.SIGKILL
                                               else rng.uniform(0.0, 0.9) * training)
                while proc.poll() is None and time.monotonic() < deadline:
                    if during_write and _checkpoint_writing(run_dir):
                        time.sleep(rng.uniform(0.0, 0.002))
                        break
                    time.sleep(0.0002 if during_write else 0.005)
                if proc.poll() is None:
                    writing = _checkpoint_writing(run_dir)
                    proc.send_signal(sig)  # to the process this drill started
                    proc.wait()
                    killed = True
                    result.kills += 1
                    result.during_checkpoint_write += int(writing)
            proc.wait()
            stderr = err_path.read_text()
            match = RESUMED_RE.search(stderr)
            resumed_step = int(match.group(2)) if match else None
            if (match or (not killed and proc.returncode == 0)) and resumed_step != expected_resume:
                result.problems.append(f"{run_dir}: resumed from step {resumed_step}, the newest complete "
                                       f"checkpoint was step {expected_resume}")
            if killed:
                expected_resume = _visible_checkpoints_readable(run_dir, result)
                if sig != signal.SIGKILL:
                    _check_graceful_stop(run_dir, proc.returncode, stderr, sig, result, expected_resume, max_steps)
                _log(f"kill {result.kills}: {'during a checkpoint write' if writing else 'at a random moment'}; "
                     f"newest checkpoint: step {expected_resume}", quiet)
                continue
            if proc.returncode != 0:
                result.problems.append(f"{run_dir}: relaunch failed (exit {proc.returncode}): "
                                       f"{stderr.strip().splitlines()[-1:]}")
                return result
            break
        got = _records(run_dir)
        result.losses_equal = sorted(got) == sorted(want) and all(
            _close(want[s][k], got[s][k]) for s in want for k in COMPARED)
        a, b = checkpoint.load_weights(ref, "ema"), checkpoint.load_weights(run_dir, "ema")
        result.weights_equal = a.keys() == b.keys() and all(
            torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)
        if not (result.losses_equal and result.weights_equal):
            result.problems.append(f"{run_dir}: losses or EMA weights differ from the reference run")
            break
        if result.kills >= kills:
            break
    # every kill followed by a relaunch that resumed from the newest complete checkpoint, and finished equal
    result.resumed = result.kills if not result.problems and result.losses_equal else 0
    return result


# ----------------------------------------------------------------------------------------------- shards

@dataclass
class ShardDrillResult:
    kills: int = 0
    partial_seen: list[str] = field(default_factory=list)
    identical: bool = False
    problems: list[str] = field(default_factory=list)

    def tally(self) -> str:
        same = "rerun byte-identical" if self.identical else "RERUN DIFFERS"
        partial = ("no partial shard visible" if not self.partial_seen
                   else f"{len(self.partial_seen)} PARTIAL FILES VISIBLE")
        return f"make_shards: {self.kills} kills, {same}, {partial}"

    @property
    def ok(self) -> bool:
        return self.identical and not self.partial_seen and not self.problems


def _shards_command(out: Path) -> list[str]:
    return [sys.executable, str(SHARDS_TOOL), "--source", "synthetic", "--out", str(out), "--num-classes", "3",
            "--images-per-class", "8", "--max-res", "64", "--shard-size", "2", "--val-fraction", "0.25",
            "--no-progress"]


def _visible_files(out: Path) -> dict[str, bytes]:
    names = [p for p in sorted(out.glob("*")) if p.is_file() and not p.name.startswith(".")]
    return {p.name: p.read_bytes() for p in names}


def shards_drill(work: Path, kills: int, rng: random.Random, *, quiet: bool = False,
                 sig: int = signal.SIGKILL) -> ShardDrillResult:
    """The make_shards half of the drill (see the module docstring); ``sig`` is the signal sent."""
    from cascade.data.loader import iterate_split

    result = ShardDrillResult()
    ref = work / "shards-ref"
    start = time.monotonic()
    done = subprocess.run(_shards_command(ref), env=_env(), capture_output=True, text=True, check=False)
    duration = time.monotonic() - start
    if done.returncode != 0:
        result.problems.append(f"reference make_shards failed: {done.stderr.strip().splitlines()[-1:]}")
        return result
    want = _visible_files(ref)
    round_index = 0
    while True:
        out = work / f"shards-killed-{round_index}"
        round_index += 1
        while True:
            proc = subprocess.Popen(_shards_command(out), env=_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            killed = False
            if result.kills < kills:
                deadline = time.monotonic() + rng.uniform(0.3, 1.1) * duration
                while proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.002)
                if proc.poll() is None:
                    proc.send_signal(sig)  # to the process this drill started
                    killed = True
                    result.kills += 1
            _, stderr = proc.communicate()
            if killed and sig != signal.SIGKILL and proc.returncode != -sig and not (
                    proc.returncode in (0, 128 + sig) and len(stderr.strip().splitlines()) <= 1):
                result.problems.append(f"signal {result.kills}: exit {proc.returncode}, stderr {stderr!r}")
            seen = _visible_files(out) if out.is_dir() else {}
            if killed:
                for name, data in seen.items():
                    if want.get(name) != data:
                        result.partial_seen.append(f"kill {result.kills}: {name} differs from the reference")
                if "dataset.json" in seen and seen.keys() != want.keys():
                    result.partial_seen.append(f"kill {result.kills}: dataset.json before all shards")
                if "dataset.json" in seen:  # a dataset reads whole; without dataset.json readers refuse it
                    sum(1 for _ in iterate_split(out, "train", [32]))
                unfinished = (out / ".incomplete").exists() or "dataset.json" not in seen
                _log(f"make_shards kill {result.kills}: {len(seen)} finished files visible"
                     f"{'' if unfinished else ' (killed after it finished)'}", quiet)
                if unfinished:
                    continue  # rerun the same command
            elif proc.returncode != 0:
                result.problems.append(f"rerun failed (exit {proc.returncode}): {stderr.strip().splitlines()[-1:]}")
                return result
            break
        if seen != want:
            result.problems.append(f"{out} differs from the reference")
            return result
        if result.kills >= kills:
            result.identical = True
            return result


@cli_main("fault_drill", interrupted="interrupted; run the same command to start again")
def main(argv: list[str] | None = None) -> int:
    """0 when every kill left a consistent state, 1 otherwise; bad input one line and 2; Ctrl-C one line and 130."""
    p = OneLineArgumentParser(prog="fault_drill", description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20, help="signals to the training run (default 20)")
    p.add_argument("--shard-kills", type=int, default=20, help="signals to make_shards (default 20)")
    p.add_argument("--work", default=None, help="work folder (default: a new temporary folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    p.add_argument("--quiet", action="store_true", help="print only the tally")
    p.add_argument("--signal", default="KILL", choices=("KILL", "TERM", "USR1"),
                   help="the signal sent (default KILL; TERM and USR1 also check the graceful stop)")
    args = p.parse_args(argv)
    sig = signal.Signals[f"SIG{args.signal}"]
    work = Path(args.work or tempfile.mkdtemp(prefix="fault-drill-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    from cascade.data.shards import write_shards
    from cascade.data.sources import SyntheticSource

    shards = work / "train-shards"
    if not (shards / "dataset.json").is_file():
        write_shards(SyntheticSource(num_classes=3, images_per_class=6, seed=0), shards, shard_size=4,
                     val_fraction=0.25, max_res=32, overwrite=True)
    started = time.monotonic()
    train = train_drill(work, shards, args.kills, rng, quiet=args.quiet, sig=sig)
    print(train.tally())
    for problem in train.problems + train.damaged_seen:
        print(f"  problem: {problem}")
    shard = shards_drill(work, args.shard_kills, rng, quiet=args.quiet, sig=sig)
    print(shard.tally())
    for problem in shard.problems + shard.partial_seen:
        print(f"  problem: {problem}")
    print(f"({time.monotonic() - started:.0f} s; work folder {work})")
    return 0 if train.ok and shard.ok else 1


if __name__ == "__main__":
    sys.exit(main())
