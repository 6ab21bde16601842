"""The scorer in-process on a tiny random Llama: MC dropout really samples, base scoring is deterministic,
padding does not change a row's score, and nothing but ids and prompts gets in."""
import pytest
import torch

from actors.model import FastDropout, adapter_state, set_mc_dropout
from actors.scorer import Scorer
from pipeline.data import load_pool
from pipeline.tasks import demo

from conftest import scorer_kwargs, tiny_config, trained_like_adapter


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    return Scorer(**scorer_kwargs(tiny_config(tiny_model_dir), tiny_model_dir))


@pytest.fixture(scope="module")
def batch():
    table = load_pool("demo", demo(), demo_size=12).for_scoring()
    return {k: table.column(k).to_pylist() for k in table.column_names}


@pytest.fixture
def trained(scorer):
    fresh = adapter_state(scorer.model)
    scorer.set_adapter(trained_like_adapter(fresh))
    yield scorer
    scorer.set_adapter(fresh)


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits[:, -1]


def test_mc_passes_differ_and_eval_passes_do_not(trained):
    model = trained.model
    ids = torch.tensor([trained.tokenizer("is 12 + 30 greater than 40?").input_ids], device=trained.device)
    model.eval()
    assert torch.equal(_logits(model, ids), _logits(model, ids))
    set_mc_dropout(model)
    a, b = _logits(model, ids), _logits(model, ids)
    sampling = [m for m in model.modules() if m.training and not list(m.children())]
    model.eval()
    assert not torch.allclose(a, b)
    # only the LoRA dropouts sample: deft's FastDropout on CPU, torch's own Dropout on a GPU
    assert sampling and all(isinstance(m, FastDropout if trained.device.type == "cpu" else torch.nn.Dropout) for m in sampling)


def test_lora_mode_gives_bald_and_base_mode_is_deterministic(trained, batch):
    lora = trained.score(batch, "lora")
    assert all(b > 0 for b in lora["bald"])  # passes disagree on every row
    base1, base2 = trained.score(batch, "base"), trained.score(batch, "base")
    assert base1["entropy"] == base2["entropy"]
    assert all(b == 0 for b in base1["bald"])  # one deterministic pass
    assert lora["entropy"] != base1["entropy"]  # the adapter is really on in lora mode


def test_a_fresh_scorers_first_eval_is_deterministic(tiny_model_dir, batch):
    """A new actor (a resumed run, a restart) whose first call is an evaluation: no dropout may sample in it.
    deft's CPU dropouts were swapped in after eval(), in training mode, and the first "eval" call sampled."""
    fresh = Scorer(**scorer_kwargs(tiny_config(tiny_model_dir), tiny_model_dir))
    assert not [name for name, m in fresh.model.named_modules() if m.training]
    fresh.set_adapter(trained_like_adapter(adapter_state(fresh.model)))
    first = fresh.score(batch, "eval")
    assert fresh.score(batch, "lora")["bald"] != [0.0] * len(batch["prompt"])  # MC passes really sample ...
    assert fresh.score(batch, "eval") == first  # ... and the evaluations around them do not
    fresh.model.train()  # however the model was left
    assert fresh.score(batch, "eval") == first


def test_mc_scoring_is_reproducible_for_a_fixed_seed(trained, batch):
    assert trained.score(batch, "lora")["bald"] == trained.score(batch, "lora")["bald"]


def test_fresh_adapter_equals_base(scorer, batch):
    # B = 0: the adapter adds nothing, and LoRA dropout (applied before A) cannot change the output.
    lora, base = scorer.score(batch, "lora"), scorer.score(batch, "base")
    assert torch.allclose(torch.tensor(lora["probs"]), torch.tensor(base["probs"]), atol=1e-6)
    assert lora["bald"] == pytest.approx([0.0] * len(batch["prompt"]), abs=1e-9)


def test_set_adapter_changes_u_lora_not_u_base(scorer, batch):
    before_lora, before_base = scorer.score(batch, "lora"), scorer.score(batch, "base")
    fresh = adapter_state(scorer.model)
    version = scorer.set_adapter(trained_like_adapter(fresh, seed=5))
    try:
        after_lora, after_base = scorer.score(batch, "lora"), scorer.score(batch, "base")
    finally:
        scorer.set_adapter(fresh)
    assert after_lora["entropy"] != pytest.approx(before_lora["entropy"])
    assert after_base["entropy"] == before_base["entropy"]
    assert scorer.info()["adapter_version"] >= version and scorer.info()["model_loads"] == 1


def test_batched_scores_equal_one_at_a_time(scorer, batch):
    together = scorer.score(batch, "base")
    for i in range(len(batch["prompt"])):
        alone = scorer.score({"example_id": [batch["example_id"][i]], "prompt": [batch["prompt"][i]]}, "base")
        assert torch.allclose(torch.tensor(alone["probs"][0]), torch.tensor(together["probs"][i]), atol=1e-5)


def test_results_keep_the_input_order(scorer, batch):
    out = scorer.score(batch, "base")
    assert out["example_id"] == batch["example_id"]
    reversed_batch = {k: v[::-1] for k, v in batch.items()}
    assert scorer.score(reversed_batch, "base")["entropy"] == pytest.approx(out["entropy"][::-1], abs=1e-6)


def test_scorer_refuses_labels(scorer, batch):
    with pytest.raises(ValueError, match=r"extra columns \['label'\]"):
        scorer.score({**batch, "label": ["true"] * len(batch["prompt"])}, "base")
    with pytest.raises(ValueError, match="mode"):
        scorer.score(batch, "gold")


def test_bad_adapter_is_rejected(scorer):
    state = adapter_state(scorer.model)
    broken = dict(list(state.items())[1:])
    with pytest.raises(ValueError, match="missing LoRA keys"):
        scorer.set_adapter(broken)


def test_generation_scoring_matches_a_hand_computation(tiny_model_dir):
    cfg = tiny_config(tiny_model_dir, task={"name": "gsm8k", "max_new_tokens": 6})
    gen = Scorer(**scorer_kwargs(cfg, tiny_model_dir))
    prompts = ["Question: how many is 3 + 4?\nAnswer:", "Question: 7?\nAnswer:"]
    out = gen.score({"example_id": ["a", "b"], "prompt": prompts}, "base")
    # By hand for row 0: greedy-decode, then teacher-force prompt + answer unpadded and average the NLL.
    tok, model = gen.tokenizer, gen.model
    ids = tok(prompts[0], return_tensors="pt").input_ids.to(gen.device)
    with torch.inference_mode(), model.disable_adapter():
        seq = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        answer = seq[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in answer:
            answer = answer[: answer.index(tok.eos_token_id) + 1]
        full = torch.tensor([ids[0].tolist() + answer], device=gen.device)
        logp = torch.log_softmax(model(input_ids=full).logits[0, ids.shape[1] - 1 : -1].float(), -1)
    nll = -logp[torch.arange(len(answer)), torch.tensor(answer)].mean().item()
    ent = -(logp.exp() * logp).sum(-1).mean().item()
    assert out["pe"][0] == pytest.approx(nll, abs=1e-4)
    assert out["me"][0] == pytest.approx(ent, abs=1e-4)
    assert out["answer"][0] == tok.decode(answer, skip_special_tokens=True)
    assert out["n_tokens"][0] == ids.shape[1] + len(answer)


def test_fast_dropout_keeps_the_expectation():
    torch.manual_seed(0)
    drop = FastDropout(0.1).train()
    x = torch.ones(400_000)
    y = drop(x)
    assert (y == 0).float().mean().item() == pytest.approx(0.1, abs=0.003)
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)
    assert torch.equal(drop.eval()(x), x)


def test_the_output_head_gets_a_contiguous_input(scorer, batch):
    """A strided last-position slice sent PEFT's bf16 CPU head through a broadcast copy of the whole
    vocabulary matrix per row (5x slower scoring); load_model makes the head's input contiguous."""
    seen = []
    head = scorer.model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    try:
        scorer.score(batch, "eval")
    finally:
        handle.remove()
    assert seen and all(seen)


def test_a_unit_that_needs_another_adapter_is_refused(tiny_model_dir, tmp_path):
    """A scorer Ray restarted holds the initial adapter (token 0); a lora/eval unit naming a later broadcast
    must fail (the driver revives it and sends the adapter again), never score with the wrong weights."""
    from actors.scorer import StaleAdapter
    from pipeline.data import write_inputs

    scorer = Scorer(**scorer_kwargs(tiny_config(tiny_model_dir), tiny_model_dir))  # a fresh one, as after a restart
    inp = write_inputs(load_pool("demo", demo(), demo_size=12).for_scoring(), tmp_path / "in")
    unit = (inp.path, 0, inp.positions[:4], 4)
    with pytest.raises(StaleAdapter, match="holds adapter 0, the unit needs 3"):
        scorer.score_unit(*unit, "lora", 0, str(tmp_path / "a.parquet"), adapter_token=3)
    assert scorer.score_unit(*unit, "base", 0, str(tmp_path / "b.parquet"), adapter_token=3) == 4  # base needs none
    scorer.set_adapter(trained_like_adapter(adapter_state(scorer.model)), token=3)
    assert scorer.score_unit(*unit, "lora", 0, str(tmp_path / "c.parquet"), adapter_token=3) == 4


# ---- a shared prompt prefix runs once per block -------------------------------------------------------
INSTRUCTION = ("You are grading arithmetic questions. Read each question carefully, work out both sides, "
               "and answer with one word only. Questions follow.\n\n")


@pytest.fixture(scope="module")
def templated(batch):
    # rows of different lengths, so the blocks pad between the shared instruction and each row's own tokens
    return {"example_id": batch["example_id"],
            "prompt": [INSTRUCTION + "Think it over. " * (i % 5) + p for i, p in enumerate(batch["prompt"])]}


class _Tokens:
    """Counts the token positions the model embeds, and the widths of the batches whose LoRA dropouts sampled."""

    def __init__(self, model):
        self.positions, self.sampled_widths = 0, []
        emb = model.get_input_embeddings()
        self.hooks = [emb.register_forward_hook(self._embedded)]
        drop = next(m for m in model.modules() if isinstance(m, (FastDropout, torch.nn.Dropout)))
        self.hooks.append(drop.register_forward_pre_hook(self._dropout))

    def _embedded(self, module, args, out):
        self.positions += args[0].numel()

    def _dropout(self, module, args):
        if module.training:
            self.sampled_widths.append(args[0].shape[0])

    def remove(self):
        for h in self.hooks:
            h.remove()


def _score_counting(scorer, batch, mode, share: bool):
    was, scorer.prefix_sharing = scorer.prefix_sharing, share
    tokens = _Tokens(scorer.model)
    try:
        return scorer.score(batch, mode), tokens
    finally:
        tokens.remove()
        scorer.prefix_sharing = was


def _blocks(scorer, prompts):
    """The scorer's blocks for `prompts`: token ids sorted by length, batch_size rows each."""
    seqs = sorted(scorer.tokenizer(prompts).input_ids, key=len)
    bs = scorer.scoring_cfg.batch_size_on(False)
    return [seqs[i:i + bs] for i in range(0, len(seqs), bs)]


def test_shared_prefix_needs_enough_tokens_and_leaves_each_row_its_last_token():
    from actors.scorer import MIN_SHARED_PREFIX, shared_prefix

    long = list(range(100, 100 + MIN_SHARED_PREFIX))
    assert shared_prefix([long + [1, 2], long + [3]]) == MIN_SHARED_PREFIX
    assert shared_prefix([long + [1], long + [1]]) == MIN_SHARED_PREFIX  # identical rows keep their last token
    assert shared_prefix([long[:-1] + [1], long[:-1] + [2]]) == 0  # too short to be worth a forward
    assert shared_prefix([long + [1, 2]]) == 0  # one row shares with nobody
    assert shared_prefix([[7] + long, [8] + long]) == 0  # a common middle is not a prefix


def test_a_shared_prefix_runs_once_per_block_and_pass_and_gives_each_rows_own_scores(scorer, trained, templated):
    from actors.scorer import shared_prefix

    blocks = _blocks(scorer, templated["prompt"])
    assert all(shared_prefix(b) > 0 for b in blocks) and any(len(b[0]) != len(b[-1]) for b in blocks)  # padded
    for mode in ("base", "eval"):  # base: the adapter off; eval: the trained adapter, which spreads the scores
        shared, fewer = _score_counting(trained, templated, mode, share=True)
        whole, more = _score_counting(trained, templated, mode, share=False)
        assert fewer.positions == sum(shared_prefix(b) + len(b) * (len(b[-1]) - shared_prefix(b)) for b in blocks)
        assert more.positions == sum(len(b) * len(b[-1]) for b in blocks)
        assert shared["n_tokens"] == whole["n_tokens"]
        for i in range(len(templated["prompt"])):  # against each row alone: no padding, no sharing
            alone = trained.score({"example_id": [templated["example_id"][i]], "prompt": [templated["prompt"][i]]}, mode)
            assert torch.allclose(torch.tensor(shared["probs"][i]), torch.tensor(alone["probs"][0]), atol=1e-5)


def test_a_model_with_a_sliding_window_does_not_share(scorer):
    """Sharing is exact only on a full-attention cache: a sliding window would count the pads between the
    prefix and a row as distance."""
    from transformers import MistralConfig, MistralForCausalLM

    from actors.scorer import plain_kv_cache

    assert scorer.prefix_sharing and plain_kv_cache(scorer.model, scorer.device)
    tiny = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1)
    assert plain_kv_cache(MistralForCausalLM(MistralConfig(**tiny, sliding_window=None)), torch.device("cpu"))
    assert not plain_kv_cache(MistralForCausalLM(MistralConfig(**tiny, sliding_window=8)), torch.device("cpu"))


def test_a_shared_prefix_still_samples_its_dropout_in_mc_passes(trained, templated):
    shared, tokens = _score_counting(trained, templated, "lora", share=True)
    blocks = _blocks(trained, templated["prompt"])
    # each pass samples the prefix once (one row wide) and then the block's rows
    assert tokens.sampled_widths == [w for b in blocks for _ in range(trained.scoring_cfg.mc_passes) for w in (1, len(b))]
    assert all(b > 0 for b in shared["bald"])
    assert trained.score(templated, "lora")["bald"] == shared["bald"]  # reproducible for a fixed seed
    whole, _ = _score_counting(trained, templated, "lora", share=False)
    assert shared["bald"] != whole["bald"]  # the prefix mask is one per block now, so the samples differ


def test_a_shared_prefix_estimates_the_same_predictive_mean(trained, templated):
    """Each row's passes sample the same distribution either way: with enough passes the MC means agree (at
    T=3 they differ by up to ~0.13 here, which is MC noise, not bias)."""
    was, trained.scoring_cfg.mc_passes = trained.scoring_cfg.mc_passes, 128
    try:
        shared, _ = _score_counting(trained, templated, "lora", share=True)
        whole, _ = _score_counting(trained, templated, "lora", share=False)
    finally:
        trained.scoring_cfg.mc_passes = was
    gap = (torch.tensor(shared["probs"]) - torch.tensor(whole["probs"])).abs().max().item()
    assert gap < 0.05, gap
