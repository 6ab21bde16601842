"""LiST pieces without Ray: the KL loss by hand, the verbalizer loss against the scorer's distribution,
the meta-weight gradient against finite differences, the student's batches, and config errors."""
import math

import pytest
import torch
import yaml
from torch.func import functional_call

from actors.model import attach_lora, load_adapter_state, adapter_state, load_model
from actors.scorer import left_pad, positions, verbalizer_token_ids
from actors.self_training import PseudoData, kl_per_example, meta_gradient, meta_weights, student_batches
from actors.trainer import IGNORE, collate, encode_example, label_word_logits, verbalizer_loss
from pipeline.config import Config, ConfigError, LoraConfig, ModelConfig, from_dict, frozen_config, to_dict
from pipeline.run_dir import RunDir
from pipeline.self_training import teacher_information

from conftest import build_tokenizer, trained_like_adapter

WORDS = [" true", " false"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def lora_model(model_dir, dtype=torch.float32, dropout=0.0):
    torch.manual_seed(0)  # LoRA A's init draws from the global generator: the same model in any test order
    # On the CPU even where CUDA is present: these check arithmetic (float64 finite differences), not devices.
    base = load_model(model_dir, ModelConfig(name=model_dir, dtype="float32"), device=torch.device("cpu"))
    model = attach_lora(base, LoraConfig(r=4, dropout=dropout),
                        adapter_dtype_follows_base=False)
    load_adapter_state(model, trained_like_adapter(adapter_state(model), seed=1, scale=0.3))  # B != 0: real gradients
    return model.to(dtype).eval()


def test_kl_per_example_by_hand():
    student = torch.tensor([[0.0, math.log(3.0)], [5.0, 0.0]])  # q = [0.25, 0.75], [~0.9933, ~0.0067]
    teacher = torch.tensor([[0.5, 0.5], [1.0, 0.0]])  # the second row checks 0 log 0 = 0
    q2 = 1 / (1 + math.exp(-5.0))
    expected = [0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), math.log(1.0 / q2)]
    assert kl_per_example(student, teacher).tolist() == pytest.approx(expected, rel=1e-6)
    assert kl_per_example(torch.log(teacher[:1]), teacher[:1]).item() == pytest.approx(0.0, abs=1e-7)


def test_verbalizer_loss_reads_the_scorers_distribution(tiny_model_dir, tok):
    """The logits the verbalizer loss uses are the scorer's: the label words at the prompt's last token."""
    model = lora_model(tiny_model_dir)
    ids = torch.tensor(verbalizer_token_ids(tok, WORDS))
    prompts = ["is 3 greater than 5?\nthe correct answer is", "is 12 greater than 4? yes or no\nthe correct answer is"]
    examples = [encode_example(tok, p, w, 256, add_eos=False) for p, w in zip(prompts, [" false", " true"])]
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        keep = batch["answer_span"] + 1
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=keep).logits
        z, target = label_word_logits(logits, batch["labels"][:, -keep:], ids)
        pids, mask = left_pad([tok(p).input_ids for p in prompts], tok.pad_token_id)
        scorer = model(input_ids=pids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1, ids]
        loss = verbalizer_loss(logits, batch["labels"][:, -keep:], ids)
    assert target.tolist() == [1, 0]
    torch.testing.assert_close(z, scorer, rtol=1e-4, atol=1e-5)
    by_hand = -(torch.log_softmax(scorer, -1)[0, 1] + torch.log_softmax(scorer, -1)[1, 0]) / 2
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    bad = batch["labels"][:, -keep:].clone()
    bad[bad != IGNORE] = tok(" C").input_ids[0]
    with pytest.raises(ValueError, match="label word"):
        label_word_logits(logits, bad, ids)


def test_meta_gradient_matches_finite_differences(tiny_model_dir, tok):
    """-dL_meta/dw_i at w = 0 against central differences of the meta loss after the virtual step
    theta - meta_lr * sum_i w_i grad KL_i, in float64 (LoRA dropout off so both sides are deterministic);
    at w = 0 it is linear in meta_lr."""
    model = lora_model(tiny_model_dir, torch.float64)
    ids = torch.tensor(verbalizer_token_ids(tok, WORDS))
    pseudo_prompts = ["is 3 greater than 5?\nthe correct answer is", "is 40 greater than 2?\nthe correct answer is",
                      "is 7 greater than 7?\nthe correct answer is"]
    teacher = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.6, 0.4]], dtype=torch.float64)
    data = PseudoData.encode(tok, [{"example_id": str(i), "prompt": p, "probs": t.tolist()} for i, (p, t) in
                                   enumerate(zip(pseudo_prompts, teacher))],
                             [{"example_id": "g0", "prompt": "is 9 greater than 1?\nthe correct answer is", "target": " true"},
                              {"example_id": "g1", "prompt": "is 1 greater than 9?\nthe correct answer is", "target": " false"}],
                             WORDS, 256)
    pb, gb = collate(data.pseudo, tok.pad_token_id), collate(data.gold, tok.pad_token_id)
    meta_lr = 5e-3  # small enough that the meta loss is near-linear in w over the difference step
    analytic = meta_gradient(model, pb, teacher, gb, ids, meta_lr)

    named = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def meta_loss(w: torch.Tensor) -> float:
        z = label_word_logits(*_window(functional_call(model, named, args=(), kwargs=_kw(pb)).logits, pb), ids)[0]
        grads = torch.autograd.grad((w * kl_per_example(z, teacher)).sum(), list(named.values()))
        stepped = {n: p - meta_lr * g for (n, p), g in zip(named.items(), grads)}
        with torch.no_grad():
            zm, gold = label_word_logits(*_window(functional_call(model, stepped, args=(), kwargs=_kw(gb)).logits, gb), ids)
            return torch.nn.functional.cross_entropy(zm, gold).item()

    h = 3e-3
    numeric = []
    for i in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[i] = h
        numeric.append(-(meta_loss(e) - meta_loss(-e)) / (2 * h))
    # Llama's RMSNorm computes in float32 even in a float64 model, so the differences carry ~1e-7 relative
    # rounding of the loss: about 1e-5 absolute at this step. The three values differ far more than that.
    assert analytic.tolist() == pytest.approx(numeric, rel=1e-3, abs=2e-5)
    assert max(abs(x) for x in numeric) > 1e-3 and len({round(x, 4) for x in numeric}) == 3  # not zeros, not one value
    assert meta_gradient(model, pb, teacher, gb, ids, 2 * meta_lr).tolist() == pytest.approx((2 * analytic).tolist(), rel=1e-5)
    w = meta_weights(model, pb, teacher, gb, ids, meta_lr)
    clamped = torch.clamp(analytic, min=0)
    assert w.tolist() == pytest.approx((clamped / (clamped.sum() + 1e-6)).tolist())
    assert all(x >= 0 for x in w.tolist())

    # The real step reuses the meta-gradient's forward: the same logits, and through them the same
    # parameter gradient, as forwarding the batch again (dropout off, so the two are comparable).
    w2, z = meta_weights(model, pb, teacher, gb, ids, meta_lr, with_logits=True)
    assert w2.tolist() == w.tolist()
    reused = torch.autograd.grad((w2 * kl_per_example(z, teacher)).sum(), list(named.values()))
    z_fresh = label_word_logits(*_window(model(**_kw(pb)).logits, pb), ids)[0]
    fresh = torch.autograd.grad((w2 * kl_per_example(z_fresh, teacher)).sum(), list(named.values()))
    assert torch.allclose(z, z_fresh, rtol=1e-6, atol=1e-9)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-12) for a, b in zip(reused, fresh))
    assert any(a.abs().max() > 0 for a in reused)


def _kw(batch):
    keep = batch["answer_span"] + 1
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "position_ids": batch["position_ids"], "logits_to_keep": keep}


def _window(logits, batch):
    return logits, batch["labels"][:, -(batch["answer_span"] + 1):]


def test_student_batches_are_seeded_and_split_by_rank():
    one = student_batches(10, 4, 7, seed=3, rank=0, world=1)
    assert len(one) == 7 and one == student_batches(10, 4, 7, seed=3, rank=0, world=1)
    assert one != student_batches(10, 4, 7, seed=4, rank=0, world=1)
    assert sorted(sum(one[:3], [])) == list(range(10))  # the first epoch covers every row once
    two = [student_batches(10, 4, 7, seed=3, rank=r, world=2) for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*two)] == [sorted(b) for b in one]


def _cfg(**sections):
    base = {"task": {"name": "demo"}, "self_training": {"enabled": True}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return from_dict(Config, base)


@pytest.mark.parametrize("probs, expected", [
    ([[1.0, 0.0], [0.0, 1.0]], 1.0),  # sure and balanced: one full label's information
    ([[0.5, 0.5], [0.5, 0.5]], 0.0),  # unsure of every row
    ([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1]], 0.0),  # the same answer everywhere, however sure: the prior
    ([[0.51, 0.49], [0.49, 0.51]], None),  # nearly unsure: by hand below
    ([[0.9, 0.1], [0.1, 0.9]], None),
    ([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], 0.5),  # sure, but 2 of 4 classes: ln 2 of ln 4
])
def test_teacher_information_by_hand(probs, expected):
    def h(q):
        return -sum(x * math.log(x) for x in q if x > 0)

    if expected is None:  # I = H(mean p) - mean H(p), over ln K
        k = len(probs[0])
        mean = [sum(p[j] for p in probs) / len(probs) for j in range(k)]
        expected = (h(mean) - sum(h(p) for p in probs) / len(probs)) / math.log(k)
    assert teacher_information(probs) == pytest.approx(expected, abs=1e-12)
    assert teacher_information([[2 * x for x in p] for p in probs]) == pytest.approx(expected, abs=1e-12)  # unnormalised


def test_teacher_information_refuses_what_is_not_a_distribution():
    with pytest.raises(ValueError, match="1 of the teacher's 2 pseudo-label distributions are not probabilities"):
        teacher_information([[float("nan"), 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="not probabilities"):
        teacher_information([[0.0, 0.0], [0.5, 0.5]])


def test_a_run_from_before_the_guards_resumes_without_them(tmp_path):
    """A run's config.yaml written before skip_one_class / min_teacher_information existed is read with
    what that run did (no guard), not today's defaults; a config that names them keeps them."""
    data = to_dict(_cfg())
    for key in ("skip_one_class", "min_teacher_information"):
        del data["self_training"][key]
    old = frozen_config(data).self_training
    assert (old.skip_one_class, old.min_teacher_information) == (False, None)
    new = frozen_config(to_dict(_cfg())).self_training
    assert (new.skip_one_class, new.min_teacher_information) == (True, 0.05)
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    rd.config_file.write_text(yaml.safe_dump(data))
    assert rd.read_config().self_training.min_teacher_information is None


@pytest.mark.parametrize("sections, message", [
    ({"task": {"name": "gsm8k"}}, "self_training.enabled needs a verbalizer task"),
    ({"train": {"zero_stage": 3}}, "self_training.enabled needs train.zero_stage 2"),
    ({"self_training": {"sessions": 0}}, "self_training.sessions should be >= 1"),
    ({"self_training": {"steps": 0}}, "self_training.steps should be >= 1"),
    ({"self_training": {"warmup_fraction": 1.5}}, r"self_training.warmup_fraction should be in \[0, 1\]"),
    ({"self_training": {"meta_batch": 0}}, "self_training.meta_batch should be >= 1"),
    ({"self_training": {"lr": 0}}, "self_training.lr should be positive"),
    ({"self_training": {"meta_lr": -1}}, "self_training.meta_lr should be positive"),
    ({"self_training": {"min_confidence": 1.0}}, r"self_training.min_confidence should be in \[0, 1\)"),
    ({"self_training": {"preset": "huge"}}, "self_training.preset should be one of"),
    ({"self_training": {"skip_one_class": "sometimes"}}, "self_training.skip_one_class"),
    ({"self_training": {"min_teacher_information": 1.0}}, r"self_training.min_teacher_information should be in \[0, 1\) or null"),
    ({"self_training": {"min_teacher_information": -0.1}}, r"self_training.min_teacher_information should be in \[0, 1\) or null"),
    ({"self_training": {"session": 2}}, "unknown config key 'self_training.session'"),
    ({"train": {"loss": "verbalizer"}, "task": {"name": "gsm8k"}, "self_training": {"enabled": False}},
     "train.loss verbalizer needs a verbalizer task"),
])
def test_self_training_config_errors(sections, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**sections)


def test_self_training_defaults_are_the_authors_and_the_small_preset_applies():
    st = _cfg().self_training
    assert (st.sessions, st.steps, st.warmup_fraction, st.batch_size, st.meta_batch, st.lr, st.meta_lr, st.min_confidence) == \
        (6, 1000, 0.6, 16, 4, 1e-4, 5e-6, None)
    assert st.skip_one_class and st.min_teacher_information == 0.05  # deft's own guards, beyond LiST
    small = _cfg(self_training={"preset": "small", "sessions": 3}).self_training
    assert small.sessions == 3 and small.steps == from_dict(type(st), {"preset": "small"}).steps < 1000
    assert _cfg().train.loss == "lm" and _cfg(train={"preset": "paper", "loss": "verbalizer"}).train.loss == "verbalizer"
