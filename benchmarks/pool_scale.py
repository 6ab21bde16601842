"""The driver's own cost on a large pool: peak memory and CPU per scoring call, per million rows.

    python -m benchmarks.pool_scale --rows 1000000 --passes 1
    python -m benchmarks.pool_scale --rows 20000              # a quick look

It writes a synthetic JSONL pool of --rows distinct questions, loads it as a run does (validated row by row
into the Parquet pool cache), starts local Ray with --actors long-lived scorers on a tiny random Llama
(benchmarks.tiny_model: the model costs little, so the driver's share shows) and does what a round does:
u_base over the whole pool, then, with a trained-like adapter, u_lora (T = --passes) over the unlabelled
rows and the top --select by score. Memory is the driver process's peak resident set (getrusage; Ray's
own processes are not counted: they are not the driver); CPU is the driver process's CPU time (all its
threads, Ray's in-process core worker included) during each call.

The last line printed is one JSON object with the figures: driver_peak_rss_mb, driver_cpu_s_per_million
(per scoring call), rows_per_s (the u_lora call) and the setup.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="pool rows")
    p.add_argument("--passes", type=int, default=1, help="MC-dropout passes T of the u_lora call")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--select", type=int, default=100, help="rows selected by the round (top b)")
    p.add_argument("--labeled", type=int, default=1000, help="rows already labelled (left out of u_lora)")
    p.add_argument("--work-dir", default=None, help="where the pool file, cache and model go (default: a temp dir)")
    return p.parse_args(argv)


def rss_mb() -> float:
    """This process's peak resident set so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_pool(path: Path, rows: int) -> None:
    """Distinct yes/no questions in the demo task's format, written as they are made (never all in memory)."""
    with path.open("w") as f:
        for i in range(rows):
            a, b = i, (i * 7919) % 1_000_003
            f.write(json.dumps({"question": f"is {a} greater than {b}?", "answer": "true" if a > b else "false"}) + "\n")


def timed(fn):
    """fn() with its wall time and this process's CPU time."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np
    import pyarrow as pa

    from actors.model import adapter_state, attach_lora, load_model
    from benchmarks.device import cpu_name
    from benchmarks.tiny_model import save_tiny_model, trained_like_adapter
    from cluster.runtime import connect, shutdown
    from pipeline.config import Config, from_dict
    from pipeline.data import load_pool
    import torch

    from pipeline.loop import LoraScores
    from pipeline.scoring import PoolScorer, base_uncertainty
    from pipeline.strategies import MEASURE_COLUMNS
    from pipeline.uncertainty import dynamic_score
    from pipeline.strategies import top_positions
    from pipeline.io import read_floats, take_rows
    from pipeline.tasks import demo

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="deft-pool-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = save_tiny_model(work / "tiny-llama")
    cfg = from_dict(Config, {
        "model": {"name": model_dir, "dtype": "float32", "max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.3},
        "task": {"name": "demo"},
        "data": {"cache_dir": str(work / "cache")},
        "scoring": {"mc_passes": args.passes, "batch_size": args.batch_size, "num_actors": args.actors},
        "cluster": {"num_cpus": os.cpu_count()},
    })
    source = work / "pool.jsonl"
    t0 = time.perf_counter()
    write_pool(source, args.rows)
    print(f"wrote {args.rows:,} rows in {time.perf_counter() - t0:.1f} s", flush=True)
    import ray

    owns_ray = not ray.is_initialized()  # joined, not started (a test's Ray): leave it running
    connect(None, os.cpu_count(), tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    rss_start = rss_mb()
    pool, load_s, load_cpu = timed(lambda: load_pool(str(source), demo(), cache_dir=cfg.data.cache_dir))
    print(f"loaded and validated in {load_s:.1f} s (driver CPU {load_cpu:.1f} s); peak RSS {rss_mb():.0f} MB", flush=True)
    scorer = PoolScorer(cfg, model_dir)
    calls = []
    try:
        (work / "base_uncertainty.parquet").unlink(missing_ok=True)  # a reused --work-dir scores again
        # as the loop does: every column to the run's base cache, one measure back to the driver
        base, wall, cpu = timed(lambda: base_uncertainty(scorer, pool.scoring_input(), work / "base_uncertainty.parquet",
                                                         columns=["entropy"]))
        calls.append({"call": "base", "rows": base.num_rows, "wall_s": wall, "driver_cpu_s": cpu})
        print(f"u_base: {base.num_rows:,} rows in {wall:.1f} s, driver CPU {cpu:.1f} s; peak RSS {rss_mb():.0f} MB", flush=True)
        lora_model = attach_lora(load_model(model_dir, cfg.model, None), cfg.lora)
        scorer.set_adapter(trained_like_adapter(adapter_state(lora_model)))
        del lora_model
        labeled = pool.ids.slice(0, args.labeled)

        def lora_round():
            """What a STAR round of the loop does: every lora column to a file, one back, the mix,
            scores.parquet streamed from the file, the top b from its score column, then the prompts and
            labels of the picked rows."""
            rows = pool.rows_without(labeled)
            u_base = base.column("entropy").to_numpy()[rows]
            lora = LoraScores(scorer.score_to_file(pool.scoring_input(rows=rows), "lora", work / "lora.parquet",
                                                   progress=False))
            u_lora = lora.floats("entropy")
            score = dynamic_score(torch.from_numpy(u_lora), torch.from_numpy(u_base), 0.5).numpy()
            lora.write_scores(work / "scores.parquet", "entropy", sorted(set(MEASURE_COLUMNS["verbalizer"].values())),
                              u_base, score)
            del u_base, u_lora, score
            score = read_floats(work / "scores.parquet", "score")
            top = top_positions(score, args.select, np.random.default_rng(0))
            picked = take_rows(work / "scores.parquet", top, ["example_id"]).column("example_id")
            return len(rows), pool.rows(picked, ["prompt", "label"])

        (n, picked), wall, cpu = timed(lora_round)
        calls.append({"call": "lora", "rows": n, "wall_s": wall, "driver_cpu_s": cpu})
        print(f"u_lora + select: {n:,} rows in {wall:.1f} s, driver CPU {cpu:.1f} s; peak RSS {rss_mb():.0f} MB", flush=True)
        assert picked.num_rows == args.select and pa.types.is_string(picked.schema.field("prompt").type)
    finally:
        scorer.shutdown()
        if owns_ray:
            shutdown()
    per_million = [c["driver_cpu_s"] / c["rows"] * 1e6 for c in calls]
    result = {
        "benchmark": "pool_scale", "rows": args.rows, "passes": args.passes, "actors": args.actors,
        "batch_size": args.batch_size, "model": "tiny random Llama (2 layers, hidden 64)", "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "driver_peak_rss_mb": round(rss_mb(), 1), "driver_rss_before_load_mb": round(rss_start, 1),
        "driver_cpu_s_per_million": round(max(per_million), 2),
        "rows_per_s": round(calls[-1]["rows"] / calls[-1]["wall_s"], 1),
        "load_s": round(load_s, 1), "load_driver_cpu_s": round(load_cpu, 1),
        "calls": [{k: round(v, 2) if isinstance(v, float) else v for k, v in c.items()} for c in calls],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
