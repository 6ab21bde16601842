"""A tiny random Llama (2 layers, hidden 64) with a BPE tokenizer trained in-process: what the tests run on,
and what `benchmarks.pool_scale` scores with, so that the driver's own cost is what shows. Nothing here
touches the network."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.demo import demo_rows


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["question"] + " " + r["answer"] for r in demo_rows(200, seed=1)]
    corpus += ["Question: how many? Answer: 3 + 4 = 7 #### 7", " A B C D true false The correct answer is"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_tiny_model(vocab_size: int, attention_dropout: float = 0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attention_dropout=attention_dropout,
    )
    return LlamaForCausalLM(config)


def save_tiny_model(path: str | Path) -> str:
    """The tiny model and its tokenizer, saved as a model directory deft loads like any other."""
    tok = build_tokenizer()
    build_tiny_model(len(tok)).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def trained_like_adapter(state: dict, seed: int = 0, scale: float = 0.5) -> dict:
    """A copy of `state` with nonzero B matrices: LoRA dropout only changes outputs once B != 0."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(v.shape, generator=g, dtype=torch.float32) * scale).to(v.dtype) if "lora_B" in k else v.clone()
        for k, v in state.items()
    }
