"""Shared fixtures: a tiny random Llama with an in-process BPE tokenizer, configs for it, local Ray.

Nothing here touches the network: the tokenizer is trained from strings in this file and the model is
built from a config with a fixed seed.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path

import pytest
import torch

from pipeline.config import Config, from_dict, to_dict
from pipeline.demo import demo_rows

# The project takes the shared datasets by path (they are never committed): ../shared/datasets.
SHARED = Path(os.environ.get("DEFT_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer()
    build_tiny_model(len(tok)).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def tiny_config(model_dir: str, **sections) -> Config:
    """A Config for the tiny model; `sections` override per section, e.g. scoring={"mc_passes": 5}."""
    base = {
        "model": {"name": model_dir, "dtype": "float32", "max_length": 256},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.3},
        "task": {"name": "demo", "max_new_tokens": 8},
        "data": {"path": "demo", "demo_size": 40},
        "scoring": {"mc_passes": 3, "batch_size": 4, "num_actors": 2},
        "cluster": {"num_cpus": 2},
        "train": {"min_steps": 0},  # the tests choose their epochs; warm_start keeps its default (on)
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return from_dict(Config, base)


def scorer_kwargs(cfg: Config, model_dir: str) -> dict:
    return dict(
        model_path=model_dir,
        model=to_dict(cfg.model),
        lora=to_dict(cfg.lora),
        task=to_dict(cfg.task),
        scoring=to_dict(cfg.scoring),
        seed=cfg.seed,
    )


def trained_like_adapter(state: dict, seed: int = 0, scale: float = 0.5) -> dict:
    """A copy of `state` with nonzero B matrices: LoRA dropout only changes outputs once B != 0."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(v.shape, generator=g, dtype=torch.float32) * scale).to(v.dtype) if "lora_B" in k else v.clone()
        for k, v in state.items()
    }


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One embedded Ray for the whole session, with its files kept inside pytest's tmp dir."""
    from cluster.runtime import connect, shutdown

    temp = tmp_path_factory.mktemp("ray")
    ray = connect(num_cpus=2, temp_dir=str(temp))
    yield ray
    shutdown()
