"""What a benchmark ran on, named, and how much of a GPU's peak it used (MFU).

MFU is achieved model FLOPs over the device's dense peak for the dtype: 2·params FLOPs per token for a
forward pass (scoring), 6·params for a training step (forward and backward). The LoRA adapter's FLOPs
are left out (well under 1% at r 64 on a 7B model), so MFU is slightly understated.
"""
from __future__ import annotations

from typing import Optional

from cluster.runtime import cpu_name  # noqa: F401  (benchmarks name the CPU in their output)

# Dense (no sparsity) peak TFLOPS per GPU from the vendors' datasheets; matched by substring, first match
# wins, so the more specific names come first. fp32 is the non-tensor-core rate (PyTorch does not use TF32
# for matmuls by default).
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
]


def gpu_name() -> Optional[str]:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def peak_tflops(device: Optional[str], dtype: str) -> Optional[float]:
    key = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype.replace("torch.", ""), dtype)
    for name, peaks in PEAK_TFLOPS:
        if device and name in device:
            return peaks.get(key)
    return None


def mfu(params: int, tokens_per_s: float, device: Optional[str], dtype: str, train: bool = False) -> Optional[dict]:
    """{"tflops": achieved, "peak_tflops", "mfu"} on a known GPU; None on CPU (no meaningful peak) or an
    unknown device."""
    peak = peak_tflops(device, dtype)
    if peak is None:
        return None
    achieved = (6 if train else 2) * params * tokens_per_s / 1e12
    return {"tflops": round(achieved, 2), "peak_tflops": peak, "mfu": round(achieved / peak, 4)}
