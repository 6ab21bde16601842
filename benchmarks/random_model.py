"""A randomly initialised model of a known shape, saved as a model directory deft loads like any other.

    python -m benchmarks.random_model --tokenizer DIR --shape llama2-7b --out /tmp/llama2-7b-random

Throughput depends on a model's shape, not its weights, so this is how the benchmarks measure tokens/s
and MFU for model sizes whose weights cannot be downloaded (no hub on these machines). The tokenizer
comes from any local model directory (the embedded SmolLM2's, by default). Accuracy figures from such a
model mean nothing; only the timings do.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# Llama-architecture shapes: (hidden, intermediate, layers, heads, kv heads). Vocabulary comes from the tokenizer.
SHAPES = {
    "smollm2-135m": (576, 1536, 30, 9, 3),
    "smollm2-1.7b": (2048, 8192, 24, 32, 32),
    "llama2-7b": (4096, 11008, 32, 32, 32),
}


def llama_config(shape: str, vocab_size: int, bos: int = None, eos: int = None, pad: int = None, dtype: str = "bfloat16"):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv = SHAPES[shape]
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
        tie_word_embeddings=shape.startswith("smollm2"), bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        dtype=dtype,
    )


def build(tokenizer_dir: str, shape: str, out: str, dtype: str = "bfloat16") -> dict:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = llama_config(shape, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, dtype)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising 7B parameters on a CPU takes minutes
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    info = {"shape": shape, "params": params, "dtype": dtype, "out": out, "seconds": round(time.perf_counter() - t0, 1)}
    (Path(out) / "random-model.json").write_text(json.dumps(info))
    return info


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=None, help="a local model dir whose tokenizer to use (default: the embedded SmolLM2's)")
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    tokenizer = args.tokenizer
    if tokenizer is None:
        from actors.model import resolve_model_path
        from pipeline.config import ModelConfig

        tokenizer = resolve_model_path(ModelConfig())
    info = build(tokenizer, args.shape, args.out, args.dtype)
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()
