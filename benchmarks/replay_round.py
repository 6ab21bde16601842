"""Replay one round's training from a finished run, step by step, under the run's own settings or others.

    python -m benchmarks.replay_round runs/quickstart/random-seed0 --round 1
    python -m benchmarks.replay_round runs/quickstart/random-seed0 --round 1 --set train.lr=1e-3

Round k trains on the labels of rounds 0..k, from round k-1's adapter when `train.warm_start` is on (else
from a fresh one), in-process, with the run's config and seed: without --set, the step losses are the
round's own (`rounds/k/train_metrics.json` has them as `step_loss`, for in-process training on the same
machine). --set changes the training recipe only, to see what another setting would have done with the
same rows and the same start. Printed per step: lr, loss and gradient norm before clipping. The last line
is one JSON object with the step losses, the largest jump of the loss from one step to the next, and the
CPU it ran on. Nothing in the run directory is written.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import pyarrow.compute as pc

from benchmarks.device import cpu_name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory whose round --round has been trained")
    p.add_argument("--round", type=int, required=True, dest="k")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="train.KEY=VALUE",
                   help="a training setting to replay with instead of the run's (train.* or lora.dropout)")
    return p.parse_args(argv)


def replay_config(run, overrides: list[str]):
    """The run's frozen config with `overrides` applied: train.* only (and LoRA dropout, a training knob),
    so the rows, the seed and the starting adapter stay the run's."""
    from pipeline.config import ConfigError, apply_overrides, from_dict, to_dict, Config

    for o in overrides:
        key = o.partition("=")[0].strip()
        if not (key.startswith("train.") or key == "lora.dropout"):
            raise ConfigError(f"--set {key}: only train.* and lora.dropout can change in a replay")
    return from_dict(Config, apply_overrides(to_dict(run.cfg), overrides))


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipeline.loop import ActiveLearningRun
    from pipeline.training import read_adapter_state, train_adapter_in_process

    run = ActiveLearningRun.open(args.run_dir)
    cfg = replay_config(run, args.overrides)
    labeled = run.run_dir.read_labeled()
    ids = labeled.filter(pc.less_equal(labeled.column("round_added"), args.k)).column("example_id")
    table = run.training_table()
    table = table.filter(pc.is_in(table.column("example_id"), value_set=ids.combine_chunks()))
    init = read_adapter_state(run.run_dir.adapter_dir(args.k - 1)) if cfg.train.warm_start and args.k > 0 else None
    with tempfile.TemporaryDirectory() as tmp:
        result = train_adapter_in_process(cfg, run.model_path, table, tmp, run.task.kind == "generation", init)
    losses = result.metrics["step_loss"]
    for i, (lr, loss, norm) in enumerate(zip(result.metrics["step_lr"], losses, result.metrics["step_grad_norm"])):
        print(f"[replay] step {i + 1:3d}  lr {lr:.2e}  loss {loss:.4f}  grad norm {norm:.2f}", flush=True)
    jumps = [b - a for a, b in zip(losses, losses[1:])]
    out = {"benchmark": "replay_round", "run_dir": str(args.run_dir), "round": args.k, "overrides": args.overrides,
           "rows": table.num_rows, "warm_start": init is not None, "steps": len(losses), "step_loss": losses,
           "largest_rise": max(jumps, default=0.0), "final_epoch_loss": result.metrics["epoch_loss"][-1],
           "cpu": cpu_name()}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    import sys

    from pipeline.errors import BAD_INPUT, describe

    try:
        main()
    except Exception as e:  # bad input (a path that is no run, a key that is not training's) is one line
        message, code = describe(e)
        if code != BAD_INPUT:
            raise
        print(f"replay_round: error: {message}", file=sys.stderr)
        sys.exit(2)
