"""Fresh-start plateau: how many optimizer steps a fresh adapter needs before it stops answering one class.

    python -m benchmarks.fresh_start configs/quickstart.yaml --labels 32 --steps 32,64 --seeds 0,1,2
    python -m benchmarks.fresh_start configs/quickstart.yaml --labels 32 --steps 32 --set train.lr=1e-3

For every (seed, steps): a fresh LoRA (what `train.preset: paper` trains every round, and what LiST's
student is) is trained in-process with the config's recipe on `--labels` seeded random pool rows, with
`train.min_steps` set to `steps`, then evaluated on the test split. Reported per run: accuracy, the share
of test rows given the most common answer (`one_class` when >= --one-class, default 0.95: the adapter
learned the class prior and nothing else), and the training loss per epoch. The last line is one JSON
object with every run, the medians per step count and the CPU it ran on.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from typing import Optional

import numpy as np
import pyarrow as pa

from benchmarks.device import cpu_name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a deft config with a verbalizer task and a test split")
    p.add_argument("--labels", type=int, default=32, help="labelled rows trained on")
    p.add_argument("--steps", default="32,64", help="optimizer-step counts to compare (train.min_steps)")
    p.add_argument("--seeds", default="0,1,2", help="each seed draws its own labelled rows and adapter init")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="a fixed field")
    p.add_argument("--one-class", type=float, default=0.95, help="the answer share above which a run counts as one-class")
    return p.parse_args(argv)


class Bench:
    """What the training benchmarks share: the config's pool, its test split, the model and an in-process
    scorer that evaluates an adapter on the test split (label-free: it sees example_id and prompt)."""

    def __init__(self, config: str, overrides: list[str], bench: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from actors.scorer import Scorer
        from pipeline.config import ConfigError, load_config, to_dict
        from pipeline.data import eval_split_from_config, pool_from_config
        from pipeline.preflight import DATA_SEED, check_model
        from pipeline.tasks import get_task

        self.config, self.overrides = config, overrides
        cfg = load_config(config, overrides)
        self.task = get_task(cfg.task)
        if self.task.kind != "verbalizer":
            raise ConfigError(f"benchmarks.{bench} needs a verbalizer task, got {self.task.kind}")
        self.pool = pool_from_config(cfg.data, self.task, DATA_SEED, require_label=True)
        test = eval_split_from_config(cfg.data, self.task, DATA_SEED, cfg.al.eval_limit)
        if test is None:
            raise ConfigError(f"benchmarks.{bench} needs data.test_path")
        self.model_path = check_model(cfg.model)
        self.scorer = Scorer(model_path=self.model_path, model=to_dict(cfg.model), lora=to_dict(cfg.lora),
                             task=to_dict(cfg.task), scoring=to_dict(cfg.scoring), seed=cfg.seed)
        rows = test.table
        self.gold = dict(zip(rows.column("example_id").to_pylist(), rows.column("label").to_pylist()))
        self.test_input = {"example_id": rows.column("example_id").to_pylist(), "prompt": rows.column("prompt").to_pylist()}
        self.ece_bins = cfg.al.ece_bins

    def cfg(self, extra: list[str]):
        from pipeline.config import load_config

        return load_config(self.config, self.overrides + extra)

    def labelled(self, example_ids) -> pa.Table:
        """(example_id, prompt, target) of these pool rows, as the loop trains them, and their labels."""
        rows = self.pool.rows(example_ids, ["prompt", "target", "label"])
        return pa.table({"example_id": example_ids, "prompt": rows.column("prompt"), "target": rows.column("target"),
                         "label": rows.column("label")})

    def evaluate(self, state: Optional[dict]) -> dict:
        """Accuracy, ECE and the most common answer of an adapter state (None: the base model) on the test split."""
        from pipeline.evaluation import evaluate

        if state is not None:
            self.scorer.set_adapter(state)
        out = self.scorer.score(self.test_input, "eval" if state is not None else "base")  # base: adapter disabled
        scored = pa.table({k: out[k] for k in ("example_id", "prediction", "confidence")})
        result = evaluate(scored, self.gold, self.task, self.ece_bins)  # counts the answers (a verbalizer task)
        top, count = max(result["answers"].items(), key=lambda kv: kv[1])
        return {**result, "top_answer": top, "top_share": count / len(out["prediction"])}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from pipeline.config import ConfigError
    from pipeline.training import train_adapter_in_process

    steps_list = [int(s) for s in args.steps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    bench = Bench(args.config, args.overrides, "fresh_start")
    if args.labels > len(bench.pool):
        raise ConfigError(f"--labels {args.labels} is more than the pool's {len(bench.pool)} rows")
    base = bench.evaluate(None)
    ids = bench.pool.table.column("example_id")
    runs, t0 = [], time.perf_counter()
    for seed in seeds:
        chosen = ids.take(np.sort(np.random.default_rng(seed).choice(len(ids), args.labels, replace=False)))
        labelled = bench.labelled(chosen)
        label_share = Counter(labelled.column("label").to_pylist()).most_common(1)[0][1] / args.labels
        for steps in steps_list:
            cfg = bench.cfg([f"seed={seed}", f"train.min_steps={steps}"])
            with tempfile.TemporaryDirectory() as tmp:
                t1 = time.perf_counter()
                result = train_adapter_in_process(cfg, bench.model_path, labelled, os.path.join(tmp, "adapter"), add_eos=False)
                train_s = time.perf_counter() - t1
            r = bench.evaluate(result.state)
            run = {"seed": seed, "steps": result.metrics["steps"], "asked_steps": steps, "labels": args.labels,
                   "label_majority_share": round(label_share, 3), "accuracy": r["accuracy"], "ece": round(r["ece"], 4),
                   "top_answer": r["top_answer"], "top_share": r["top_share"], "one_class": r["top_share"] >= args.one_class,
                   "epoch_loss": [round(x, 4) for x in result.metrics["epoch_loss"]], "train_s": round(train_s, 1)}
            runs.append(run)
            print(f"[fresh_start] seed {seed}, {run['steps']} steps: accuracy {run['accuracy']:.3f}, "
                  f"{run['top_share']:.0%} answered {run['top_answer']!r}, last epoch loss {run['epoch_loss'][-1]:.3f}, "
                  f"{train_s:.0f}s", flush=True)
    by_steps = {}
    for steps in steps_list:
        mine = [r for r in runs if r["asked_steps"] == steps]
        by_steps[str(steps)] = {"median_accuracy": statistics.median(r["accuracy"] for r in mine),
                                "one_class_runs": sum(r["one_class"] for r in mine), "runs": len(mine)}
    print(f"\nbase model: accuracy {base['accuracy']:.3f}, {base['top_share']:.0%} answered {base['top_answer']!r}")
    print(f"{'steps':>6} {'median acc':>11} {'one-class runs':>15}")
    for steps, s in by_steps.items():
        print(f"{steps:>6} {s['median_accuracy']:>11.3f} {s['one_class_runs']:>9} of {s['runs']}")
    out = {"benchmark": "fresh_start", "config": args.config, "fixed": args.overrides, "labels": args.labels,
           "seeds": seeds, "cpu": cpu_name(), "base": {k: base[k] for k in ("accuracy", "top_answer", "top_share")},
           "by_steps": by_steps, "runs": runs, "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out, sort_keys=True))
    return out


if __name__ == "__main__":
    main()
