#!/usr/bin/env bash
# One prepared GPU check for the day a GPU is lent: under 8 minutes on one GPU.
#
#   bash tools/gpu_check.sh fetch      # HERE (with internet): download the wheels the GPU machine lacks into .whl/
#   bash tools/gpu_check.sh            # THERE (repository root): every step below; figures in $OUT/gpu_check.json
#
# Steps, each under its own timeout; a failing step is recorded in the JSON (rc, seconds, log tail) and the
# next one runs:
#   env      python, torch, CUDA device, nvidia-smi
#   install  a venv over the machine's python (--system-site-packages: its CUDA torch), plus the wheels in .whl/
#            (no index is reachable on the lent machine; with GPU_CHECK_ONLINE=1 pip fetches what is missing)
#   tests    the test suite's GPU-marked tests (pytest -m gpu)
#   train    every tiny stage 100 steps, bf16 + channels_last + SDPA (base32 also with xformers if it imports),
#            then the cascade sampled from those runs (precision auto)
#   bench    tools/bench.py --device cuda --compare diffusers on base32 and the ~35M model (big32)
# Environment: OUT (default /tmp/gpu_check_out), GPU_CHECK_DEVICE (default cuda; cpu for a local smoke run),
# GPU_CHECK_NO_VENV=1 (use GPU_CHECK_PYTHON as it is), GPU_CHECK_STEPS (default 100), GPU_CHECK_BENCH_MODES (default fp32,bf16,bf16+cl), GPU_CHECK_BENCH_STAGES
# (default base32,big32), GPU_CHECK_PYTHON (python3), GPU_CHECK_VENV (/tmp/gpu_check_venv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS="$ROOT/.whl"
# What the lent machine's image lacks among the project's and the bench extra's needs (KINDS.md's package list).
FETCH=(kornia kornia_rs hydra-core omegaconf "antlr4-python3-runtime==4.9.3" webdataset braceexpand diffusers
       importlib_metadata zipp)

if [[ "${1:-}" == "fetch" ]]; then
    mkdir -p "$WHEELS"
    exclude="$(git rev-parse --git-path info/exclude)"  # also right in a git worktree
    mkdir -p "$(dirname "$exclude")"
    grep -qxF "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
    for pkg in "${FETCH[@]}"; do
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d "$WHEELS" "$pkg" || echo "gpu_check: could not fetch $pkg" >&2
    done
    ls -la "$WHEELS"
    exit 0
fi

OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
PY="${GPU_CHECK_PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
STEPS="${GPU_CHECK_STEPS:-100}"
BENCH_MODES="${GPU_CHECK_BENCH_MODES:-fp32,bf16,bf16+cl}"
BENCH_STAGES="${GPU_CHECK_BENCH_STAGES:-base32,big32}"
VENV="${GPU_CHECK_VENV:-/tmp/gpu_check_venv}"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
LOG="$OUT/gpu_check.log"
STEPS_FILE="$WORK/steps.jsonl"
: > "$LOG"
: > "$STEPS_FILE"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# step NAME TIMEOUT_S COMMAND...: run under a timeout, append {name, rc, seconds, tail} to the steps file.
step() {
    local name="$1" limit="$2"
    shift 2
    local start end rc=0
    start=$(date +%s.%N)
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
    # bash -c: timeout runs programs, not shell functions (they are exported below)
    timeout --kill-after=10 "$limit" bash -euo pipefail -c "$*" > "$WORK/$name.log" 2>&1 || rc=$?
    end=$(date +%s.%N)
    cat "$WORK/$name.log" >> "$LOG"
    tail -n 5 "$WORK/$name.log"
    "$PY" - "$name" "$rc" "$start" "$end" "$WORK/$name.log" "$STEPS_FILE" <<'PYEOF' || true
import json, sys
name, rc, start, end, log, out = sys.argv[1:]
tail = open(log, errors="replace").read()[-1500:]
with open(out, "a") as f:
    f.write(json.dumps({"name": name, "rc": int(rc), "timed_out": int(rc) in (124, 137),
                        "seconds": round(float(end) - float(start), 1), "log_tail": tail}) + "\n")
PYEOF
    echo "=== $name: rc=$rc" | tee -a "$LOG"
}

env_step() {
    "$PY" - "$WORK/env.json" <<'PYEOF'
import json, platform, subprocess, sys
import torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "machine": platform.machine()}
if torch.cuda.is_available():
    info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported(),
                capability=list(torch.cuda.get_device_capability(0)))
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as err:
    info["nvidia_smi"] = f"unavailable: {err}"
print(json.dumps(info, indent=1))
json.dump(info, open(sys.argv[1], "w"))
PYEOF
}

# $VENV/bin/python as a wrapper running $PY itself (GPU_CHECK_NO_VENV=1, or when the venv step failed)
wrap_python() {
    mkdir -p "$VENV/bin"
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$(command -v "$PY")" > "$VENV/bin/python"
    chmod +x "$VENV/bin/python"
}

install_step() {
    if [[ "${GPU_CHECK_NO_VENV:-0}" == "1" ]]; then
        wrap_python
    else
        "$PY" -m venv --system-site-packages "$VENV"
    fi
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
        "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl
    fi
    if [[ "${GPU_CHECK_ONLINE:-0}" == "1" ]]; then
        "$VENV/bin/python" -m pip install -q webdataset hydra-core kornia diffusers || true
        "$VENV/bin/python" -m pip install -q xformers || echo "xformers did not install"
    fi
    "$VENV/bin/python" - <<'PYEOF'
import importlib
missing = []
for mod in ("torch", "accelerate", "kornia", "hydra", "omegaconf", "webdataset", "safetensors", "torchmetrics",
            "diffusers", "pytest"):
    try:
        importlib.import_module(mod)
    except Exception as err:  # noqa: BLE001 - report every failure
        missing.append(f"{mod} ({type(err).__name__}: {err})")
try:
    import xformers.ops  # noqa: F401
    print("xformers: available")
except Exception as err:  # noqa: BLE001
    print(f"xformers: unavailable ({type(err).__name__})")
if missing:
    raise SystemExit("missing: " + "; ".join(missing))
import cascade.training.trainer, stages  # noqa: F401,E401 - the project imports
print("imports ok")
PYEOF
}

tests_step() {
    "$VENV/bin/python" -m pytest -q -m gpu -p no:cacheprovider tests/ -rs
}

train_step() {
    "$VENV/bin/python" - "$DEVICE" "$STEPS" "$WORK" "$WORK/train.json" <<'PYEOF'
"""Every tiny stage STEPS steps (bf16 + channels_last; SDPA, and base32 with xformers too), then the cascade sampled."""
import json, subprocess, sys, time
from pathlib import Path

import torch

import cascade.nets.attention as attention
import stages
from cascade.data.sources import SyntheticSource
from cascade.data.shards import write_shards
from cascade.training.trainer import StageTrainer
from cascade.training.trainer_config import DataConfig, RunConfig, TrainerConfig

device, steps, work, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
if device == "cuda" and not torch.cuda.is_available():
    raise SystemExit("CUDA is not available")
write_shards(SyntheticSource(num_classes=10, images_per_class=64), work / "shards", shard_size=64,
             val_fraction=0.1, max_res=256)
xops = attention._xops
results = {"device": device, "steps": steps, "xformers_available": xops is not None, "runs": []}
plan = [(name, "sdpa") for name in stages.STAGE_NAMES] + ([("base32", "xformers")] if xops is not None else [])
batch = {"base32": 64, "sr64": 32, "sr128": 16, "sr256": 8, "classifier32": 64}
for name, backend in plan:
    attention._xops = xops if backend == "xformers" else None
    run_dir = work / ("runs" if backend == "sdpa" else f"runs-{backend}") / name
    trainer = TrainerConfig(max_steps=steps, batch_size=batch[name], warmup_steps=10, ema_decay=0.999,
                            log_every=10, ckpt_every=0, sample_every=0, progress=False,
                            mixed_precision="bf16" if device == "cuda" else "no", channels_last=True)
    run = RunConfig(run_dir=str(run_dir), data=DataConfig(root=str(work / "shards"), num_workers=2), trainer=trainer)
    start = time.perf_counter()
    try:
        StageTrainer(stages.get_stage(name, "tiny"), run).run()
        records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        rates = [r["img_per_s"] for r in records[1:] if r.get("img_per_s")]
        entry = {"stage": name, "attention": backend, "batch_size": batch[name], "final_loss": records[-1]["loss"],
                 "img_per_s": len(rates) / sum(1 / r for r in rates) if rates else None,
                 "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}
    except Exception as err:  # noqa: BLE001 - record and go on with the next stage
        entry = {"stage": name, "attention": backend, "error": f"{type(err).__name__}: {err}"[:500]}
    entry["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(entry), flush=True)
    results["runs"].append(entry)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
attention._xops = xops
start = time.perf_counter()
proc = subprocess.run([sys.executable, "tools/sample_cascade.py", "--runs", str(work / "runs"), "--classes", "0,1,2,3",
                       "--num-per-class", "2", "--device", device, "--precision", "auto", "--out",
                       str(work / "samples")], capture_output=True, text=True, check=False)
results["sample_cascade"] = {"rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
                             "stdout": proc.stdout[-500:], "stderr": proc.stderr[-300:]}
print(json.dumps(results["sample_cascade"]), flush=True)
json.dump(results, open(out, "w"), indent=1)
if proc.returncode != 0 or any("error" in r for r in results["runs"]):
    raise SystemExit("some runs failed (see the JSON)")
PYEOF
}

bench_step() {
    "$VENV/bin/python" tools/bench.py --device "$DEVICE" --stages "$BENCH_STAGES" --modes "$BENCH_MODES" \
        --compare diffusers --steps 5 --repeats 3 --sample-steps 4 --no-data --json "$WORK/bench.json"
}

export ROOT WHEELS OUT PY DEVICE STEPS BENCH_MODES BENCH_STAGES VENV WORK
export -f wrap_python env_step install_step tests_step train_step bench_step

step env 60 env_step
step install 90 install_step
[[ -x "$VENV/bin/python" ]] || wrap_python  # no venv: the later steps use the machine's python as it is
step tests 150 tests_step
step train 150 train_step
step bench 180 bench_step

"$PY" - "$STEPS_FILE" "$WORK" "$OUT/gpu_check.json" <<'PYEOF'
import json, sys
from pathlib import Path
steps_file, work, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
report = {"steps": [json.loads(ln) for ln in open(steps_file) if ln.strip()]}
for name in ("env", "train", "bench"):
    path = work / f"{name}.json"
    if path.is_file():
        report[name] = json.loads(path.read_text())
report["ok"] = all(s["rc"] == 0 for s in report["steps"])
Path(out).write_text(json.dumps(report, indent=1))
print(f"wrote {out}: " + ", ".join(f"{s['name']}={'ok' if s['rc'] == 0 else 'rc ' + str(s['rc'])}" for s in report["steps"]))
PYEOF
