"""What a device computes natively, and the precision that follows from it (training and sampling share it).

No global state: functions of a ``torch.device``.
"""

from __future__ import annotations

import torch

SAMPLING_PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA with bf16 support, or a CPU with AVX512-BF16 / AMX.

    On other CPUs (e.g. AVX2-only) bf16 autocast still runs, emulated and much slower than float32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.cpu.get_cpu_capability() == "AVX512" and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_sampling_precision(precision: str, device: torch.device) -> str:
    """"auto" → "bf16" (autocast) where ``device`` computes bf16 natively (`native_bf16`), else "fp32"; "fp32" and
    "bf16" pass through. Raises ValueError naming the choices for anything else."""
    if precision not in SAMPLING_PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown; use one of {', '.join(SAMPLING_PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def resolve_mixed_precision(mode: str, device: torch.device) -> str:
    """Training precision: "auto" → "bf16" where the device computes bf16 natively (`native_bf16`), else "no";
    other modes ("no", "bf16", "fp16") pass through."""
    if mode != "auto":
        return mode
    return "bf16" if native_bf16(device) else "no"
