"""Where a training or sampling step spends its time, grouped by kind of work (`tools/bench.py --profile`).

`profile_step(fn, steps)` runs ``fn`` under ``torch.profiler`` and returns milliseconds per step by kind
(`KINDS`): each profiled operator's self time goes to the kind of its closest classified ancestor (an operator's
own name, or one of the step's labelled scopes: `cascade.training.step.SCOPES`), except that dtype and layout
casts are always counted as casts, wherever autocast or the code inserts them. ``other`` is the rest of the step's
wall time: Python, the dispatcher and the autograd engine between operators, and the profiler's own overhead
(``profiled_ms`` against the unprofiled step time says how large that is).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile

from cascade.training.step import SCOPES

__all__ = ["KINDS", "classify", "format_profiles", "profile_step"]

KINDS = ("convolution", "matmul/attention", "normalisation", "activation", "elementwise", "casts", "optimizer",
         "EMA", "data", "other")
# An operator's kind from its name (aten ops, autograd nodes "XBackward0", "evaluate_function: XBackward0"), first
# match wins; unmatched aten ops and autograd nodes are elementwise, anything else (scopes, Python) is looked through.
_PATTERNS = (
    ("casts", re.compile(r"aten::to$|aten::_to_copy|tocopybackward|_autocast_to|aten::type_as|aten::contiguous")),
    ("convolution", re.compile(r"conv")),
    ("matmul/attention", re.compile(r"addmm|aten::mm$|aten::bmm|mmbackward|matmul|aten::linear|scaled_dot_product|"
                                    r"scaleddotproduct|flash_attention|attention|baddbmm|einsum|softmax")),
    ("normalisation", re.compile(r"group_?norm|layer_?norm|batch_?norm")),
    ("activation", re.compile(r"silu|gelu|relu|sigmoid|tanh")),
)


def classify(name: str) -> str | None:
    """The kind (one of `KINDS`) an operator's name alone says, or None (look at what runs inside it)."""
    lowered = name.lower()
    for kind, pattern in _PATTERNS:
        if pattern.search(lowered):
            return kind
    if lowered.startswith("aten::") or lowered.endswith("backward0") or "accumulategrad" in lowered:
        return "elementwise"
    return None


def _attribute(events) -> dict[str, float]:
    """Self CPU time (µs) per kind over the profiler's event tree."""
    totals: dict[str, float] = defaultdict(float)

    def walk(event, context: str | None, scoped: bool) -> None:
        if event.name in SCOPES:
            context, scoped = SCOPES[event.name], True
        elif not scoped:
            own = classify(event.name)
            # casts count as casts anywhere; otherwise the closest classified ancestor's kind holds, refined below
            # a generic (elementwise) one
            if own == "casts" or context is None or context == "elementwise" and own not in (None, "elementwise"):
                context = own
        totals[context or "other"] += event.self_cpu_time_total
        for child in event.cpu_children:
            walk(child, context, scoped)

    for event in events:
        if event.cpu_parent is None:
            walk(event, None, False)
    return totals


def profile_step(fn: Callable[[], None], steps: int, sync: Callable[[], None] = lambda: None) -> dict:
    """Profile ``steps`` calls of ``fn`` (after one unprofiled warm-up call): {"profiled_ms": wall ms per step under
    the profiler, "kinds": {kind: ms per step}} with every kind of `KINDS` present; ``other`` is the wall time no
    operator accounts for. ``sync`` waits for the device (CUDA: only CPU-side time is attributed)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        wall_us = (time.perf_counter() - start) * 1e6
    totals = _attribute(prof.events())
    kinds = {k: totals.get(k, 0.0) / steps / 1e3 for k in KINDS if k != "other"}
    kinds["other"] = max(0.0, wall_us / steps / 1e3 - sum(kinds.values()))
    return {"profiled_ms": wall_us / steps / 1e3, "kinds": kinds}


def _non_conv_ratio(kinds: dict[str, float]) -> float:
    conv = kinds["convolution"]
    return (sum(kinds.values()) - conv) / conv if conv else float("nan")


def format_profiles(results: list[dict]) -> str:
    """Per stage and mode, the training step's and the sampling step's time by kind, cascade beside diffusers when
    both were measured; each column in ms per step and % of the profiled step."""
    lines = []
    keyed = {(r["stage"], r["mode"], r["model"]): r for r in results if "profile" in r}
    for stage, mode in dict.fromkeys((s, m) for s, m, _ in keyed):
        models = [m for m in ("cascade", "diffusers") if (stage, mode, m) in keyed]
        for part, title in (("train", "training step"), ("sample", "guided sampling step")):
            cols = [(m, keyed[(stage, mode, m)]["profile"].get(part)) for m in models]
            cols = [(m, p) for m, p in cols if p]
            if not cols:
                continue
            batch = keyed[(stage, mode, cols[0][0])]["batch_size"]
            lines.append(f"\nprofile {stage} {mode}, {title} (batch {batch}): "
                         + ", ".join(f"{m} {p['profiled_ms']:.1f} ms profiled" for m, p in cols))
            lines.append(f"  {'kind':18s}" + "".join(f"{m + ' ms':>15s} {'%':>4s}" for m, _ in cols))
            for kind in KINDS:
                lines.append(f"  {kind:18s}" + "".join(
                    f"{p['kinds'][kind]:15.1f} {100 * p['kinds'][kind] / p['profiled_ms']:4.0f}" for _, p in cols))
            lines.append(f"  {'non-conv / conv':18s}" + "".join(
                f"{_non_conv_ratio(p['kinds']):15.2f}     " for _, p in cols))
    return "\n".join(lines).lstrip("\n")
