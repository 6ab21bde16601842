"""Constraint-LoRA pieces without Ray: masking, batching, B-only weight decay, schedule, evaluation."""
import json

import pyarrow as pa
import pytest
import torch

from actors.model import attach_lora, load_model, load_tokenizer
from actors.trainer import IGNORE, answer_loss, build_optimizer, build_schedule, collate, encode_example, rank_batches
from pipeline.config import LoraConfig, ModelConfig, TrainConfig
from pipeline.evaluation import evaluate, expected_calibration_error
from pipeline.report import answers_cell, one_answer
from pipeline.tasks import boolq, gsm8k

from conftest import trained_like_adapter


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir, ModelConfig(name=tiny_model_dir))


def test_prompt_tokens_carry_no_loss(tok):
    ids, labels = encode_example(tok, "is 3 + 4 greater than 5?\nthe correct answer is", " true", 256, add_eos=False)
    target = tok(" true", add_special_tokens=False).input_ids
    assert ids[-len(target):] == target and labels[-len(target):] == target
    assert set(labels[: -len(target)]) == {IGNORE}
    ids, labels = encode_example(tok, "Question: 2+2?\nAnswer:", " 4 #### 4", 256, add_eos=True)
    assert ids[-1] == tok.eos_token_id == labels[-1]


def test_long_prompts_are_cut_from_the_left(tok):
    ids, labels = encode_example(tok, "word " * 100 + "the correct answer is", " false", 16, add_eos=False)
    assert len(ids) == 16 and labels[-1] != IGNORE
    assert tok.decode(ids).endswith("the correct answer is false")


def test_collate_and_answer_loss_by_hand():
    batch = collate([([5, 6, 7], [IGNORE, IGNORE, 7]), ([5, 8], [IGNORE, 8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 5, 8]]  # left-padded, as the scorer pads
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 7], [IGNORE, IGNORE, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert batch["answer_span"] == 1
    logits = torch.zeros(2, 3, 10)  # uniform over 10 tokens: each answer token costs ln 10
    assert answer_loss(logits, batch["labels"]).item() == pytest.approx(torch.log(torch.tensor(10.0)).item())
    logits[0, 1, 7] = 100.0  # row 0's answer predicted with certainty
    assert answer_loss(logits, batch["labels"]).item() == pytest.approx(torch.log(torch.tensor(10.0)).item() / 2, rel=1e-4)


def test_rank_batches_cover_every_row_once_per_epoch_with_equal_steps():
    a, b = rank_batches(10, 4, epoch=0, seed=1, rank=0, world=2), rank_batches(10, 4, epoch=0, seed=1, rank=1, world=2)
    assert len(a) == len(b) == 3
    rows = [i for step in a + b for i in step]
    assert sorted(rows) == list(range(10))
    assert rank_batches(10, 4, 0, 1, 0, 2) == a  # seeded
    assert rank_batches(10, 4, 1, 1, 0, 2) != a  # reshuffled each epoch
    short = rank_batches(9, 4, 0, 1, 1, 2)  # a last batch of one row still gives every rank a row
    assert all(len(step) >= 1 for step in short)


def test_weight_decay_shrinks_b_and_not_a(tiny_model_dir):
    model = attach_lora(load_model(tiny_model_dir, ModelConfig(name=tiny_model_dir, dtype="float32")), LoraConfig(r=4), adapter_dtype_follows_base=False)
    from actors.model import adapter_state, load_adapter_state

    load_adapter_state(model, trained_like_adapter(adapter_state(model)))  # B != 0, else there is nothing to shrink
    cfg = TrainConfig(lr=0.1, weight_decay_b=0.5)
    opt = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.tensor([[1, 2, 3]])
    loss = model(input_ids=ids).logits.sum() * 0.0  # a zero-loss batch: zero gradients everywhere
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in n:
            assert torch.allclose(p, before[n] * (1 - 0.1 * 0.5)), n  # decoupled decay: p <- p (1 - lr wd)
        else:
            assert torch.equal(p, before[n]), n
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]


def test_linear_schedule_with_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_schedule(opt, TrainConfig(warmup_ratio=0.2), total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert lrs[2:] == pytest.approx([(10 - s) / 8 for s in range(2, 10)])


def test_ece_by_hand():
    conf = [0.95, 0.85, 0.75, 0.62, 0.58]
    correct = [1, 0, 1, 1, 0]
    # one example per bin: |1-.95| + |0-.85| + |1-.75| + |1-.62| + |0-.58|, over 5
    assert expected_calibration_error(conf, correct, n_bins=10) == pytest.approx((0.05 + 0.85 + 0.25 + 0.38 + 0.58) / 5)
    # two in one bin: |mean acc - mean conf| weighted by bin size
    assert expected_calibration_error([0.91, 0.99], [1, 0], n_bins=10) == pytest.approx(abs(0.5 - 0.95))


def test_evaluate_verbalizer_and_generation():
    scored = pa.table({"example_id": ["a", "b", "c", "d"], "prediction": ["true", "false", "true", "true"],
                       "confidence": [0.9, 0.6, 0.7, 0.8]})
    m = evaluate(scored, {"a": "true", "b": "true", "c": "true", "d": "false"}, boolq(), n_bins=10)
    assert m["accuracy"] == 0.5 and m["n"] == 4
    assert m["answers"] == {"true": 3, "false": 1} and one_answer(m) is None
    assert answers_cell(json.loads(json.dumps(m, sort_keys=True))) == "true 3, false 1"  # most given first, as stored
    sure = evaluate(scored.set_column(1, "prediction", pa.array(["false"] * 4)),
                    {"a": "true", "b": "true", "c": "true", "d": "false"}, boolq())
    assert sure["answers"] == {"false": 4} and one_answer(sure) == "false" and sure["accuracy"] == 0.25
    assert one_answer({"accuracy": 0.7}) is None and answers_cell({"accuracy": 0.7}) == ""  # a round from before
    assert m["ece"] == pytest.approx((abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.7) + abs(0 - 0.8)) / 4)
    gen = pa.table({"example_id": ["x", "y"], "prediction": ["72", None], "confidence": [0.5, 0.2]})
    assert evaluate(gen, {"x": "72", "y": "10"}, gsm8k())["accuracy"] == 0.5
    assert "answers" not in evaluate(gen, {"x": "72", "y": "10"}, gsm8k())  # free text: not counted
    with pytest.raises(ValueError, match="no gold label"):
        evaluate(gen, {"x": "72"}, gsm8k())


def test_loss_over_the_answer_span_equals_the_full_right_padded_loss(tiny_model_dir, tok):
    """Logits for the answer span only (left padding + logits_to_keep) give the loss of the plain
    right-padded, full-logits computation: same rows, same answer tokens, same positions."""
    from actors.trainer import batch_loss

    model = attach_lora(load_model(tiny_model_dir, ModelConfig(name=tiny_model_dir, dtype="float32")), LoraConfig(r=4),
                        adapter_dtype_follows_base=False)
    examples = [encode_example(tok, p, t, 256, add_eos=True) for p, t in
                [("Question: how many? Answer:", " 3 + 4 = 7 #### 7"), ("is 3 greater than 5?\nthe correct answer is", " false"),
                 ("A B C D", " A")]]
    batch = collate(examples, tok.pad_token_id)
    assert batch["answer_span"] == max(sum(1 for t in y if t != IGNORE) for _, y in examples)
    width = max(len(x) for x, _ in examples)
    right = {"input_ids": torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in examples]),
             "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in examples]),
             "labels": torch.tensor([y + [IGNORE] * (width - len(y)) for _, y in examples])}
    with torch.no_grad():
        full = answer_loss(model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits, right["labels"])
        span = batch_loss(model, batch)
    assert span.item() == pytest.approx(full.item(), rel=1e-5)
