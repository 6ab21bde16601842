"""LiST's student: how much of its teacher a fresh student learns in N steps, before and after the gold fine-tune.

    python -m benchmarks.distillation configs/quickstart.yaml --teacher-labels 32,64,96 --student-steps 32,96
    python -m benchmarks.distillation configs/quickstart.yaml --student-steps 32 --set self_training.lr=3e-3

Per seed: the teacher is trained as the loop trains it (rounds on seeded random pool rows, 32 then 64 then
96 labels by default, each round continuing from the last), and soft-labels the rest of the pool (eval mode,
label-free). For each step count, a fresh student learns those pseudo-labels exactly as a self-training
session does (`self_training` settings from the config, `preset: small` unless --set says otherwise: KL
over the label words, distillation warm-up, meta re-weighting against the gold rows), and is then fine-tuned
on the gold rows with the training recipe. Reported: test accuracy of the teacher, of each student and of
each student after its gold fine-tune, with the share of the most common answer. The last line is one JSON
object with all of it and the CPU it ran on.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa

from benchmarks.device import cpu_name
from benchmarks.fresh_start import Bench


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a deft config with a verbalizer task and a test split")
    p.add_argument("--teacher-labels", default="32,64,96", help="the teacher's rounds: labels after each")
    p.add_argument("--student-steps", default="32,96", help="student step counts to compare (self_training.steps)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="a fixed field")
    return p.parse_args(argv)


def summary(r: dict) -> dict:
    return {"accuracy": r["accuracy"], "ece": round(r["ece"], 4), "top_answer": r["top_answer"], "top_share": r["top_share"]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from actors.self_training import train_student_in_process
    from pipeline.config import ConfigError
    from pipeline.self_training import session_seed, student_loop_config
    from pipeline.training import read_adapter_state, train_adapter_in_process

    rounds = [int(n) for n in args.teacher_labels.split(",")]
    if rounds != sorted(rounds) or rounds[0] < 1:
        raise ConfigError(f"--teacher-labels should be increasing label counts, got {args.teacher_labels}")
    overrides = ["self_training.enabled=true"] + (
        [] if any(o.startswith("self_training.preset=") for o in args.overrides) else ["self_training.preset=small"])
    bench = Bench(args.config, overrides + args.overrides, "distillation")
    if rounds[-1] >= len(bench.pool):
        raise ConfigError(f"--teacher-labels {rounds[-1]} leaves no pool rows to pseudo-label ({len(bench.pool)} rows)")
    ids = bench.pool.table.column("example_id")
    results, t0 = [], time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = bench.cfg([f"seed={seed}"])
        order = np.random.default_rng(seed).permutation(len(ids))
        teacher, t1 = None, time.perf_counter()
        for n in rounds:  # the loop's warm-started rounds
            gold = bench.labelled(ids.take(order[:n]))
            with tempfile.TemporaryDirectory() as tmp:
                teacher = train_adapter_in_process(cfg, bench.model_path, gold, os.path.join(tmp, "a"), False, teacher).state
        teacher_s = time.perf_counter() - t1
        gold_rows = gold.select(["example_id", "prompt", "target"])
        rest = ids.take(order[rounds[-1]:])
        prompts = bench.pool.rows(rest, ["prompt"]).column("prompt").to_pylist()
        bench.scorer.set_adapter(teacher)
        soft = bench.scorer.score({"example_id": rest.to_pylist(), "prompt": prompts}, "eval")
        pseudo = [{"example_id": e, "prompt": p, "probs": q} for e, p, q in zip(soft["example_id"], prompts, soft["probs"])]
        run = {"seed": seed, "teacher_labels": rounds, "teacher": summary(bench.evaluate(teacher)),
               "teacher_s": round(teacher_s, 1), "pseudo_rows": len(pseudo),
               "pseudo_mean_confidence": float(np.mean(soft["confidence"])), "students": []}
        print(f"[distillation] seed {seed}: teacher on {rounds[-1]} labels, accuracy {run['teacher']['accuracy']:.3f}; "
              f"{len(pseudo)} pseudo rows, mean confidence {run['pseudo_mean_confidence']:.2f}", flush=True)
        for steps in [int(s) for s in args.student_steps.split(",")]:
            scfg = bench.cfg([f"seed={seed}", f"self_training.steps={steps}"])
            loop = student_loop_config(scfg, bench.model_path, None, session_seed(seed, 0, 0, "student"),
                                       list(bench.task.label_words))
            t1 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                metrics = train_student_in_process(loop, pseudo, gold_rows.to_pylist(), tmp)
                student = read_adapter_state(tmp)
            student_s = time.perf_counter() - t1
            with tempfile.TemporaryDirectory() as tmp:
                tuned = train_adapter_in_process(cfg, bench.model_path, gold_rows, os.path.join(tmp, "a"), False, student)
            s = {"steps": steps, "lr": loop.train["lr"], "student": summary(bench.evaluate(student)),
                 "student_loss": metrics["epoch_loss"][-1], "student_s": round(student_s, 1),
                 "fine_tuned": summary(bench.evaluate(tuned.state)), "gold_loss": tuned.metrics["epoch_loss"][-1]}
            run["students"].append(s)
            print(f"[distillation] seed {seed}, student {steps} steps: accuracy {s['student']['accuracy']:.3f} "
                  f"({s['student_s']:.0f}s), after the gold fine-tune {s['fine_tuned']['accuracy']:.3f} "
                  f"(gold loss {s['gold_loss']:.3f}, {s['fine_tuned']['top_share']:.0%} answered "
                  f"{s['fine_tuned']['top_answer']!r})", flush=True)
        results.append(run)
    out = {"benchmark": "distillation", "config": args.config, "fixed": args.overrides, "cpu": cpu_name(),
           "runs": results, "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out, sort_keys=True))
    return out


if __name__ == "__main__":
    main()
