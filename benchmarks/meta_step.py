"""LiST meta step: reusing the meta-gradient's forward of the pseudo batch for the real step, against
forwarding it again (what deft did before), on the embedded model.

    python -m benchmarks.meta_step                 # SmolLM2-135M, batch 8, meta batch 4, 6 timed steps
    python -m benchmarks.meta_step --batch 16      # the authors' batch: what their 6 x 1,000 steps would cost here

Both paths compute the same meta-weights; they differ only in the real step's forward (the reused
logits carry the meta forward's dropout mask). Each step is timed end to end: meta-gradient, the real
loss, backward and the optimizer step. A third path times a distillation warm-up step (weights 1/batch,
no meta-gradient), and from the two that deft runs it projects a round's student time at --sessions x
--student-steps with --warmup-fraction of plain steps (the authors' settings by default; the gold
fine-tunes and the pseudo-labelling come on top). The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from benchmarks.device import cpu_name, gpu_name


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="pseudo-labelled rows per step (the small preset's)")
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="timed steps per path (after one warm-up step each)")
    p.add_argument("--sessions", type=int, default=6, help="sessions a round, for the projection")
    p.add_argument("--student-steps", type=int, default=1000, help="student steps a session, for the projection")
    p.add_argument("--warmup-fraction", type=float, default=0.6, help="share of plain steps, for the projection")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from actors.model import attach_lora, load_model, load_tokenizer, resolve_model_path
    from actors.scorer import verbalizer_token_ids
    from actors.self_training import PseudoData, _label_logits, kl_per_example, meta_weights
    from actors.trainer import collate
    from pipeline.config import Config
    from pipeline.demo import demo_rows
    from pipeline.tasks import demo

    cfg, task = Config(), demo()
    cfg.model.dtype = "float32"  # what training uses (fp32 master weights)
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path, cfg.model)
    model = attach_lora(load_model(path, cfg.model, dtype=torch.float32), cfg.lora, adapter_dtype_follows_base=False)
    torch.set_num_threads(os.cpu_count())
    rows = [task.example(r) for r in demo_rows(args.batch + args.meta_batch, 0, "pool")]
    gen = torch.Generator().manual_seed(0)
    pseudo = [{"example_id": str(i), "prompt": r["prompt"],
               "probs": torch.softmax(torch.randn(len(task.labels), generator=gen), -1).tolist()}
              for i, r in enumerate(rows[: args.batch])]
    gold = [{"example_id": f"g{i}", "prompt": r["prompt"], "target": r["target"]} for i, r in enumerate(rows[args.batch:])]
    data = PseudoData.encode(tok, pseudo, gold, list(task.label_words), cfg.model.max_length)
    pb, gb = collate(data.pseudo, tok.pad_token_id), collate(data.gold, tok.pad_token_id)
    ids = torch.tensor(verbalizer_token_ids(tok, task.label_words))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    model.train()

    def step(path: str) -> float:
        t0 = time.perf_counter()
        if path == "plain":  # the distillation warm-up: every row weighs 1/batch
            z, _ = _label_logits(model, pb, ids)
            w = torch.full((z.shape[0],), 1.0 / z.shape[0])
        elif path == "reuse":
            w, z = meta_weights(model, pb, data.teacher, gb, ids, 5e-6, with_logits=True)
        else:
            w = meta_weights(model, pb, data.teacher, gb, ids, 5e-6)
            z, _ = _label_logits(model, pb, ids)
        loss = (w * kl_per_example(z, data.teacher)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times = {"forward_again": [], "reuse": [], "plain": []}
    for name in times:  # one warm-up step each, then alternate so drift hits every path alike
        step(name)
    for _ in range(args.steps):
        for name in times:
            times[name].append(step(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    session_s = args.student_steps * (args.warmup_fraction * med["plain"] + (1 - args.warmup_fraction) * med["reuse"])
    figures = {
        "median_step_s": {k: round(v, 3) for k, v in med.items()},
        "speedup": round(med["forward_again"] / med["reuse"], 3),
        "projection": {"sessions": args.sessions, "student_steps": args.student_steps,
                       "warmup_fraction": args.warmup_fraction, "student_s_per_session": round(session_s),
                       "student_h_per_round": round(args.sessions * session_s / 3600, 2)},
        "steps_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "setup": {"model": cfg.model.name, "batch": args.batch, "meta_batch": args.meta_batch, "lora_r": cfg.lora.r,
                  "dtype": "float32", "threads": torch.get_num_threads(), "cpu": cpu_name(), "gpu": gpu_name()},
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
