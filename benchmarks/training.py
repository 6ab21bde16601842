"""Training throughput: constraint-LoRA on Ray Train + DeepSpeed (1 and 2 workers) against a plain
single-process PEFT + torch loop, on the same model, data and global batch, in one run.

    python -m benchmarks.training                    # SmolLM2-135M, 64 BoolQ rows, batch 8, 2 epochs
    python -m benchmarks.training --rows 32 --epochs 1 --lora-r 8

Reported:
  *_examples_per_s   steady state: examples per second after each run's first optimizer step
  startup_overhead_Nw_s the fixed cost per round of the N-worker Ray run: fit() wall time minus time in the
                     training loop (process start, model load, DeepSpeed init, checkpoint, report)
The DeepSpeed op JIT builds happen once per machine (cached in TORCH_EXTENSIONS_DIR) and a warm-up fit
runs first so that they are not counted. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from benchmarks.device import cpu_name, gpu_name, mfu

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "boolq" / "train.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="BoolQ-format JSONL (default: %(default)s)")
    p.add_argument("--model", default=None, help="a local model dir (default: the embedded SmolLM2-135M); "
                   "`python -m benchmarks.random_model` makes one of a given shape")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="Ray Train worker counts to time (default: 1 2 on CPU; 1 and the GPU count with CUDA, "
                        "since NCCL needs one GPU per worker)")
    p.add_argument("--rows", type=int, default=64, help="labelled rows trained on")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (paper: 8)")
    p.add_argument("--lora-r", type=int, default=64, help="LoRA rank (paper: 64)")
    p.add_argument("--zero-stage", type=int, default=2, choices=[2, 3])
    p.add_argument("--no-warmup-fit", action="store_true", help="skip the warm-up fit (then JIT builds may be timed)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from actors.model import resolve_model_path
    from cluster.plan import plan_resources
    from cluster.runtime import connect, shutdown
    from pipeline.config import Config
    from pipeline.data import load_pool
    from pipeline.tasks import boolq
    from actors.trainer import train_in_process
    from pipeline.training import loop_config as _loop
    from pipeline.training import train_adapter

    cfg = Config()
    cfg.model.name = args.model or cfg.model.name
    cfg.model.dtype = "float32"
    cfg.lora.r = args.lora_r
    cfg.train.epochs, cfg.train.batch_size, cfg.train.zero_stage = args.epochs, args.batch_size, args.zero_stage
    table = load_pool(args.data, boolq(), limit=args.rows).table
    path = resolve_model_path(cfg.model)

    with tempfile.TemporaryDirectory() as tmp:
        plain = train_in_process(_loop(cfg, path, threads=os.cpu_count()), table.to_pylist(), tmp)
    ray = connect(num_cpus=os.cpu_count())
    gpus = int(ray.cluster_resources().get("GPU", 0))
    counts = args.workers or ([1, 2] if gpus == 0 else sorted({1, gpus}))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        def fit(workers: int, name: str):
            plan = plan_resources(ray.cluster_resources(), 2, cfg.cluster.scorer_cpus, train_workers=workers)
            return train_adapter(cfg, path, table, Path(tmp) / name, plan, add_eos=False, storage_path=f"{tmp}/ray_train", name=name)

        if not args.no_warmup_fit:
            warm_cfg_epochs = cfg.train.epochs
            cfg.train.epochs = 1
            fit(max(counts), "warmup")  # builds/loads DeepSpeed ops once; not timed
            cfg.train.epochs = warm_cfg_epochs
        for workers in counts:
            runs[workers] = fit(workers, f"w{workers}").metrics
    shutdown()
    from actors.model import load_tokenizer

    tok = load_tokenizer(path, cfg.model)
    tokens_per_example = sum(len(tok(p + t).input_ids) for p, t in zip(table.column("prompt").to_pylist(),
                                                                      table.column("target").to_pylist())) / table.num_rows
    params = _base_params(path)
    precision = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    one, most = runs[counts[0]], runs[counts[-1]]
    figures = {
        "plain_examples_per_s": round(plain["steady_examples_per_s"], 3),
        **{f"ray_ds_{w}w_examples_per_s": round(r["steady_examples_per_s"], 3) for w, r in runs.items()},
        "ratio_1w_vs_plain": round(one["steady_examples_per_s"] / plain["steady_examples_per_s"], 3),
        f"ratio_{counts[-1]}w_vs_{counts[0]}w": round(most["steady_examples_per_s"] / one["steady_examples_per_s"], 3),
        **{f"startup_overhead_{w}w_s": round(r["overhead_s"], 1) for w, r in runs.items()},
        "fit_s": {f"{w}w": round(r["fit_s"], 1) for w, r in runs.items()},
        "setup_in_worker_s": {f"{w}w": round(r["setup_s"], 1) for w, r in runs.items()},
        "tokens_per_example": round(tokens_per_example, 1),
        **{f"ray_ds_{w}w_tokens_per_s": round(r["steady_examples_per_s"] * tokens_per_example, 1) for w, r in runs.items()},
        # 6 x params FLOPs per trained token; only where a GPU's peak is known (per GPU: divided by the workers)
        **{f"gpu_utilisation_{w}w": mfu(params, r["steady_examples_per_s"] * tokens_per_example / w, gpu_name(), precision, train=True)
           for w, r in runs.items()},
        "epoch_loss": {"plain": [round(x, 4) for x in plain["epoch_loss"]],
                       **{f"{w}w": [round(x, 4) for x in r["epoch_loss"]] for w, r in runs.items()}},
        "setup": {"model": cfg.model.name, "params": params, "rows": table.num_rows, "epochs": args.epochs,
                  "global_batch": args.batch_size, "lora_r": args.lora_r, "zero_stage": args.zero_stage,
                  "precision": precision, "cpus": os.cpu_count(), "gpus": gpus, "gpu": gpu_name(), "cpu": cpu_name()},
    }
    print(json.dumps(figures))
    return figures


def _base_params(path: str) -> int:
    """The base model's parameter count, from its safetensors headers (no weights loaded)."""
    import math

    from safetensors import safe_open

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


if __name__ == "__main__":
    main()
