"""DeepSpeed presets. ZeRO-2 is the default: on CPU, ZeRO-3 measured 3-10x slower per step.

The optimizer is a torch AdamW built by the trainer (so weight decay can differ between LoRA A and B);
DeepSpeed wraps it, which keeps our per-group settings.
"""
from __future__ import annotations

import os

SHM_OP = "deepspeed_shm_comm"


def deepspeed_config(
    stage: int = 2,
    micro_batch_size: int = 4,
    gradient_accumulation_steps: int = 1,
    world_size: int = 1,
    bf16: bool = False,
    max_grad_norm: float = 1.0,
    offload_optimizer: bool = False,
) -> dict:
    if stage not in (2, 3):
        raise ValueError(f"train.zero_stage should be 2 or 3, got {stage}")
    zero: dict = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False, "stage3_param_persistence_threshold": 0})
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # our torch AdamW with per-group weight decay
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def skip_unused_shm_op() -> None:
    """Keep DeepSpeed from JIT-building its shared-memory allreduce op where it would never start it.

    On the CPU accelerator every process group builds `deepspeed_shm_comm` (a C++ compile, 60-80 s on 2
    cores, on first use per machine) but starts it only when LOCAL_SIZE equals the world size
    (csrc/cpu/comm/shm_interface.cpp), and Ray Train never sets LOCAL_SIZE: training uses torch's gloo
    allreduce either way. The build is pure cost, and a risk: torch's JIT guards each build with a lock
    file that a killed process leaves behind, and every later build then waits on it forever
    (torch.utils.file_baton). DeepSpeed keeps its op table as one module-level dict so that edits to it
    persist (deepspeed/ops/__init__.py), and `build_shm_op` skips an op marked incompatible there.
    """
    from deepspeed.accelerator import get_accelerator

    # Only the CPU accelerator has the op; elsewhere reading the op table would only probe every op.
    if os.environ.get("LOCAL_SIZE") or get_accelerator().device_name() != "cpu":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_OP] = False
