"""Scoring throughput: deft's MC-dropout pool scoring on Ray against three baselines, in one run.

    python -m benchmarks.scoring                       # 1,000 BoolQ rows, T=3, SmolLM2-135M, 2 actors
    python -m benchmarks.scoring --rows 200 --passes 3 --data ../shared/datasets/boolq/test.jsonl

Every path scores the same pool with the same model, the same trained (B != 0) adapter, T and dtype:
  deft       long-lived Ray actors, fixed length-sorted blocks, logits only at the answer position,
             LoRA input dropout really sampling (the quantity being sold);
  reference  the paper's algorithm: one example at a time, full logits, a Python loop over the answer
             tokens ("the correct answer is" + the label slot) with a full-vocabulary softmax per token;
             timed on --reference-rows rows (its per-example cost does not depend on the pool size);
  limit      the same PEFT model in eval mode (no dropout), batched and length-sorted, logits only at the
             last position, T plain forwards of every whole prompt in one process with all cores: what
             scoring cannot beat without sharing work between rows;
  baal       baal's ModelWrapper(MCDropoutModule(...)).predict_on_dataset, with a wrapper returning the
             verbalizer probabilities; baal's patch_module turns PEFT's LoRA dropouts into always-on ones.

Two pools (--pools): `plain`, the BoolQ prompts, and `templated`, the same rows behind one long shared
instruction and --shots worked examples. On the templated pool deft runs the shared prefix once per block
and pass (scoring.share_prefix), so it can beat `limit`, which runs every whole prompt; its MC estimates
then share the prefix's dropout noise within a block (actors/scorer.py). deft runs first on every pool and
its actors are gone before the other paths are timed.
The last line printed is one JSON object with the figures and the setup: the first pool's at the top
level, every pool's under "pools". `tokens_per_s` counts prompt tokens; MFU counts the tokens computed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actors.scorer import left_pad, positions
from benchmarks.device import cpu_name, gpu_name, mfu

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "boolq" / "train.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="BoolQ-format JSONL pool (default: %(default)s)")
    p.add_argument("--model", default=None, help="a local model dir (default: the embedded SmolLM2-135M); "
                   "`python -m benchmarks.random_model` makes one of a given shape")
    p.add_argument("--rows", type=int, default=1000, help="pool rows scored by deft, limit and baal")
    p.add_argument("--reference-rows", type=int, default=100, help="rows timed for the one-at-a-time reference")
    p.add_argument("--passes", type=int, default=3, help="MC-dropout passes T")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--actors", type=int, default=2, help="deft scoring actors")
    p.add_argument("--lora-r", type=int, default=64, help="LoRA rank (paper: 64)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--train-steps", type=int, default=8, help="AdamW steps that make the adapter's B nonzero")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per path; the median is reported")
    p.add_argument("--pools", nargs="+", default=["plain", "templated"], choices=["plain", "templated"],
                   help="plain: the BoolQ prompts; templated: the same rows behind one long shared instruction and "
                        "--shots worked examples, where deft runs the shared prefix once per block")
    p.add_argument("--shots", type=int, default=4, help="worked examples in the templated pool's instruction")
    p.add_argument("--skip", nargs="*", default=[], choices=["reference", "limit", "baal"], help="paths to leave out")
    args = p.parse_args(argv)
    if args.shots > 4 * args.train_steps:
        p.error(f"--shots {args.shots}: the worked examples come from the {4 * args.train_steps} adapter-training rows "
                "(4 per --train-steps), never from the scored ones")
    return args


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # CUDA kernels run asynchronously: time to their end, not their launch


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_adapter(model, tokenizer, pool, label_ids, steps: int, lr: float = 1e-3) -> None:
    """A few real AdamW steps on held-out labelled rows so that B != 0 and LoRA dropout matters."""
    rows = pool.table.slice(pool.table.num_rows - 4 * steps).to_pylist()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(steps):
        batch = rows[4 * step : 4 * step + 4]
        enc = tokenizer([r["prompt"] for r in batch], padding=True, return_tensors="pt").to(model.device)
        logits = model(**enc, logits_to_keep=1).logits[:, -1].float()
        target = torch.tensor([tokenizer(r["target"], add_special_tokens=False).input_ids[0] for r in batch], device=model.device)
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def reference_scores(model, tokenizer, prompts, label_ids, passes: int, answer_prefix_tokens: int) -> list:
    """The paper's per-example loop (MC dropout really on), returning mean verbalizer probabilities."""
    from actors.model import set_mc_dropout

    out = []
    set_mc_dropout(model)
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
            per_pass = []
            for _ in range(passes):
                logits = model(input_ids=ids).logits[0]  # full logits: every position, whole vocabulary
                probs = None
                for pos in range(ids.shape[1] - answer_prefix_tokens, ids.shape[1]):
                    probs = torch.softmax(logits[pos].float(), dim=-1)  # one softmax per answer token
                label_probs = probs[label_ids]
                per_pass.append(label_probs / label_probs.sum())
            out.append(torch.stack(per_pass).mean(0))
    model.eval()
    return out


def encode(tokenizer, prompts: list[str], max_length: int) -> list[list[int]]:
    """The token ids every path scores: deft's own encoding (special tokens, left truncation at max_length)."""
    return tokenizer(prompts, add_special_tokens=True, truncation=True, max_length=max_length).input_ids


def limit_scores(model, tokenizer, seqs, label_ids, passes: int, batch_size: int) -> None:
    """T eval-mode forwards per batch, batched and length-sorted, logits only at the last position."""
    seqs = sorted(seqs, key=len)
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(seqs), batch_size):
            ids, mask = left_pad(seqs[i : i + batch_size], tokenizer.pad_token_id)
            ids, mask = ids.to(model.device), mask.to(model.device)
            pos = positions(mask)
            for _ in range(passes):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
                torch.softmax(logits[:, -1, label_ids].float(), -1)


class VerbalizerWrapper(torch.nn.Module):
    """What baal needs: a module mapping a batch to class probabilities (here over the label tokens)."""

    def __init__(self, model, label_ids):
        super().__init__()
        self.model, self.label_ids = model, label_ids

    def forward(self, data):
        ids, mask = (t.to(self.model.device) for t in data)  # baal 2.1 leaves a list batch on the CPU
        pos = positions(mask)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
        return torch.softmax(logits[:, -1, self.label_ids].float(), -1)


def baal_scores(model, tokenizer, seqs, label_ids, passes: int, batch_size: int):
    from baal.bayesian.dropout import MCDropoutModule
    from baal.modelwrapper import ModelWrapper, TrainingArgs

    dataset = [(torch.tensor(s), 0) for s in seqs]

    def collate(items):
        ids, mask = left_pad([x.tolist() for x, _ in items], tokenizer.pad_token_id)
        return [ids, mask], torch.zeros(len(items))

    wrapper = ModelWrapper(
        MCDropoutModule(VerbalizerWrapper(model, label_ids)),
        TrainingArgs(batch_size=batch_size, use_cuda=torch.cuda.is_available(), workers=0, collate_fn=collate),
    )
    return wrapper.predict_on_dataset(dataset, iterations=passes, verbose=False)  # (N, C, T)


# The templated pool: every prompt starts with the same long instruction and worked examples (few-shot),
# as a classification prompt in production often does. Its examples come from the rows the adapter trains
# on, never from the scored rows.
INSTRUCTION = (
    "You are a careful reader answering yes/no questions about general knowledge. Read the question, recall "
    "what is known about its subject, and decide whether the statement it asks about holds. Answer with one "
    "word, true or false, and nothing else. A question that asks whether two things are the same is true only "
    "if they are the same thing; a question about a place, a person or a work refers to the best known one "
    "of that name. Here are worked examples.\n\n"
)


def templated_task(task, shots: list[dict]):
    """`task` with INSTRUCTION and `shots` (prompt/target rows) in front of every prompt."""
    import dataclasses

    head = INSTRUCTION + "".join(f"{r['prompt']}{r['target']}\n\n" for r in shots)
    return dataclasses.replace(task, prompt_template=head.replace("{", "{{").replace("}", "}}") + task.prompt_template)


@dataclass
class Bench:
    """What every path and pool shares: the parsed arguments, the model with its trained adapter, and the
    adapter's state (baal gets its own copy of the model)."""
    args: argparse.Namespace
    cfg: Any
    model_path: str
    model: Any
    tokenizer: Any
    state: dict
    label_ids: list


def time_others(b: Bench, prompts: list[str], seqs: list[list[int]], reference: bool) -> dict:
    """Seconds for the paths other than deft on one pool."""
    import copy

    from actors.model import attach_lora, load_adapter_state, load_model

    a, results = b.args, {}
    torch.set_num_threads(os.cpu_count())
    if "limit" not in a.skip:
        results["limit"] = _median_time(lambda: limit_scores(b.model, b.tokenizer, seqs, b.label_ids, a.passes, a.batch_size), a.repeats)
    if reference and "reference" not in a.skip:
        prefix = len(b.tokenizer("\nthe correct answer is", add_special_tokens=False).input_ids)
        ref_prompts = prompts[: a.reference_rows]
        t = _median_time(lambda: reference_scores(b.model, b.tokenizer, ref_prompts, b.label_ids, a.passes, prefix), a.repeats)
        results["reference"] = t * len(prompts) / len(ref_prompts)  # per-example cost, scaled to the pool
    if "baal" not in a.skip:
        baal_model = attach_lora(load_model(b.model_path, b.cfg.model), b.cfg.lora)  # baal patches modules in place
        load_adapter_state(baal_model, copy.deepcopy(b.state))
        results["baal"] = _median_time(lambda: baal_scores(baal_model, b.tokenizer, seqs, b.label_ids, a.passes, a.batch_size), a.repeats)
    return results


def computed_tokens(seqs: list[list[int]], batch_size: int) -> tuple[int, float]:
    """(tokens deft computes per pass, mean shared prefix per block), approximating its blocks by token
    length (the scorers sort by characters): a shared prefix once per block, each row padded to the
    block's longest remainder."""
    from actors.scorer import shared_prefix

    ordered = sorted(seqs, key=len)
    blocks = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    shared = [shared_prefix(blk) for blk in blocks]
    return sum(p + len(blk) * (len(blk[-1]) - p) for p, blk in zip(shared, blocks)), statistics.mean(shared)


def figures_for(results: dict, seqs: list[list[int]], params: int, args, dtype: str) -> dict:
    ex_s = {k: len(seqs) / v for k, v in results.items()}
    n_tokens = sum(map(len, seqs))
    computed, shared = computed_tokens(seqs, args.batch_size)
    return {
        "examples_per_s": round(ex_s["deft"], 3),
        "tokens_per_s": round(n_tokens / results["deft"], 1),  # prompt tokens
        # MFU from the tokens deft computes (x T passes), only where a GPU's peak is known
        "gpu_utilisation": mfu(params, computed * args.passes / results["deft"], gpu_name(), dtype),
        "ratio_vs_reference": round(ex_s["deft"] / ex_s["reference"], 3) if "reference" in ex_s else None,
        "ratio_vs_limit": round(ex_s["deft"] / ex_s["limit"], 3) if "limit" in ex_s else None,
        "ratio_vs_baal": round(ex_s["deft"] / ex_s["baal"], 3) if "baal" in ex_s else None,
        "examples_per_s_by_path": {k: round(v, 3) for k, v in ex_s.items()},
        "seconds_by_path": {k: round(v, 2) for k, v in results.items()},
        "pool_tokens": n_tokens,
        "mean_prompt_tokens": round(n_tokens / len(seqs), 1),
        "mean_shared_prefix_tokens": round(shared, 1),
        "deft_computed_tokens_per_pass": computed,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from actors.model import adapter_state, attach_lora, load_model, load_tokenizer, resolve_model_path
    from actors.scorer import MIN_SHARED_PREFIX, verbalizer_token_ids
    from cluster.runtime import connect, shutdown
    from pipeline.config import Config
    from pipeline.data import load_pool
    from pipeline.scoring import PoolScorer
    from pipeline.tasks import boolq

    cfg = Config()
    cfg.model.name = args.model or cfg.model.name
    cfg.model.dtype, cfg.lora.r = args.dtype, args.lora_r
    cfg.scoring.mc_passes, cfg.scoring.batch_size, cfg.scoring.num_actors = args.passes, args.batch_size, args.actors
    task = boolq()
    pool = load_pool(args.data, task, limit=args.rows + 4 * args.train_steps)
    path = resolve_model_path(cfg.model)
    torch.set_num_threads(os.cpu_count())
    tokenizer = load_tokenizer(path, cfg.model)
    label_ids = verbalizer_token_ids(tokenizer, task.label_words)
    model = attach_lora(load_model(path, cfg.model), cfg.lora)
    t0 = time.perf_counter()
    train_adapter(model, tokenizer, pool, label_ids, args.train_steps)
    bench = Bench(args, cfg, path, model, tokenizer, adapter_state(model), label_ids)
    train_s = time.perf_counter() - t0
    dtype = str(next(model.parameters()).dtype)
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)

    shots = pool.table.slice(pool.table.num_rows - args.shots).to_pylist()  # adapter-training rows, not scored
    sources = {"plain": lambda: pool, "templated": lambda: load_pool(args.data, templated_task(task, shots), limit=args.rows)}
    scored = {name: sources[name]().for_scoring().slice(0, args.rows) for name in args.pools}  # only the pools asked for
    prompts = {name: t.column("prompt").to_pylist() for name, t in scored.items()}
    seqs = {name: encode(tokenizer, p, cfg.model.max_length) for name, p in prompts.items()}  # deft's own ids

    results = {name: {} for name in args.pools}
    owns_ray = not ray.is_initialized()  # joined, not started (a test's Ray): leave it running
    connect(num_cpus=os.cpu_count())
    scorer = PoolScorer(cfg, path)
    try:
        t0 = time.perf_counter()
        scorer.set_adapter(bench.state)
        broadcast_s = time.perf_counter() - t0
        for name in args.pools:
            scorer.score(scored[name].slice(0, 2 * args.batch_size * args.actors), "lora")  # warm-up
            results[name]["deft"] = _median_time(lambda: scorer.score(scored[name], "lora"), args.repeats)
    finally:
        scorer.shutdown()
        if owns_ray:
            shutdown()
    for name in args.pools:  # with deft's actors gone
        results[name].update(time_others(bench, prompts[name], seqs[name], reference=name == "plain"))
    by_pool = {name: figures_for(results[name], seqs[name], params, args, dtype) for name in args.pools}

    figures = {
        **by_pool[args.pools[0]],  # the first pool's figures at the top level, as before
        "pools": by_pool,
        "adapter_broadcast_s": round(broadcast_s, 3),
        "setup": {
            "model": cfg.model.name, "rows": args.rows, "pools": args.pools, "mc_passes": args.passes,
            "batch_size": args.batch_size, "actors": args.actors, "lora_r": args.lora_r,
            "dtype": dtype, "adapter_train_steps": args.train_steps, "templated_shots": args.shots,
            "min_shared_prefix_tokens": MIN_SHARED_PREFIX,
            "adapter_train_s": round(train_s, 1), "reference_rows_timed": args.reference_rows,
            "data": args.data, "cpus": os.cpu_count(), "gpu": gpu_name(), "cpu": cpu_name(), "repeats": args.repeats,
        },
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
