"""Benchmark device facts: the GPU peak table's matching and the MFU arithmetic."""
import pytest

from benchmarks.device import cpu_name, mfu, peak_tflops


@pytest.mark.parametrize("name,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", "torch.bfloat16", 989.0),  # SXM
    ("NVIDIA H100 PCIe", "bfloat16", 756.0),  # the specific name wins over "H100"
    ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "float32", 19.5),
    ("NVIDIA L4", "float16", 121.0),
    ("Some Future GPU", "bfloat16", None),
    (None, "float32", None),
])
def test_peaks_by_device_name(name, dtype, peak):
    assert peak_tflops(name, dtype) == peak


def test_mfu_counts_2_params_per_forward_token_and_6_per_trained_token():
    # 7e9 params x 2 x 35,325 tokens/s = 494.55 TFLOPS: half of an H100's 989 bf16 peak
    assert mfu(7_000_000_000, 35_325, "NVIDIA H100 80GB HBM3", "bfloat16") == {"tflops": 494.55, "peak_tflops": 989.0, "mfu": 0.5001}
    assert mfu(7_000_000_000, 35_325 / 3, "NVIDIA H100 80GB HBM3", "bfloat16", train=True)["mfu"] == 0.5001
    assert mfu(135_000_000, 1e5, None, "float32") is None  # CPU: no peak, no MFU
    assert cpu_name()
