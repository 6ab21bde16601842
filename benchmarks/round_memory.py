"""The driver's memory for a STAR round's scoring phase on a large pool, through the loop's own code
(`ActiveLearningRun._scoring`), with no model: a stand-in scorer writes the score file a real scorer
would (every column of a verbalizer task, in the asked order).

    python -m benchmarks.round_memory --rows 2000000

A JSONL pool of --rows distinct questions is written and loaded once into the Parquet pool cache. Then
round 0 (u_base over the whole pool, written to the run's base cache) and round 1 (u_base read back from
that cache, u_lora over the unlabelled rows, the mix, scores.parquet) each run in a fresh process that
opens the pool as a run does, so each phase's peak is its own. Each process reports its peak RSS growth
over the opened pool. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MEASURES = ("entropy", "bald", "least_confidence", "margin", "pe")


class StandInScorer:
    """What the loop asks of a PoolScorer, without actors: `score_to_file` writes one row per asked row,
    every column a verbalizer scorer writes, in the asked order, a pool row group (4,096 rows) at a time,
    as `PoolScorer.score_to_file` does."""

    def set_adapter(self, state) -> int:
        return 1

    def score_to_file(self, inputs, mode, path, progress=True, seed=None) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.io import atomic

        ids = inputs.example_ids
        rng = np.random.default_rng(len(ids))

        def write(tmp: str) -> None:
            with pq.ParquetWriter(tmp, _schema()) as writer:
                for start in range(0, len(ids), inputs.row_group_rows):
                    part = ids.slice(start, inputs.row_group_rows)
                    n = len(part)
                    p = rng.random(n)
                    writer.write_table(pa.table({
                        "example_id": part, **{m: rng.random(n) for m in MEASURES},
                        "probs": pa.array(np.stack([p, 1 - p], 1).tolist(), pa.list_(pa.float64())),
                        "prediction": np.where(p > 0.5, "true", "false"), "confidence": np.maximum(p, 1 - p),
                        "n_tokens": rng.integers(10, 40, n),
                    }, schema=_schema()))

        return atomic(Path(path), write)


def _schema():
    import pyarrow as pa

    return pa.schema([("example_id", pa.string()), *[(m, pa.float64()) for m in MEASURES],
                      ("probs", pa.list_(pa.float64())), ("prediction", pa.string()), ("confidence", pa.float64()),
                      ("n_tokens", pa.int64())])


def config(work: Path):
    from pipeline.config import Config, from_dict

    return from_dict(Config, {
        "model": {"name": "unused"}, "task": {"name": "demo"},
        "data": {"path": str(work / "pool.jsonl"), "cache_dir": str(work / "cache")},
        "al": {"strategy": "star", "initial_size": 1000, "batch_size": 100, "rounds": 3},
    })


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now; VmHWM: the high-water mark), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Start the high-water mark (VmHWM) afresh at the current RSS (Linux >= 4.0: clear_refs, value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def phase(work: Path, k: int) -> dict:
    """Round k's scoring phase in this process. Its peak is the process's high-water RSS over the phase (the
    mark is reset once the pool is open) less its RSS just before it."""
    import pyarrow as pa

    from pipeline.io import write_parquet
    from pipeline.loop import ActiveLearningRun

    run = ActiveLearningRun(config(work), work / "run", scorer=StandInScorer(), say_logs=False)
    run.run_dir.path.mkdir(parents=True, exist_ok=True)
    run._adapter_state = lambda k: {}
    if k == 1:  # round 0's picks are labelled
        ids = run.pool.ids.slice(0, run.cfg.al.initial_size)
        write_parquet(run.run_dir.labeled_file, pa.table({
            "example_id": ids, "label": pa.array(["true"] * len(ids)), "round_added": pa.array([0] * len(ids), pa.int64()),
            "source": pa.array(["oracle"] * len(ids))}))
    len(run.pool)  # opened as a run opens it: ids and prompt lengths
    reset_peak()
    before = status_mb("VmRSS")
    t0 = time.perf_counter()
    run._scoring(k)
    peak = status_mb("VmHWM")
    return {"round": k, "rows": len(run.pool), "seconds": round(time.perf_counter() - t0, 1),
            "rss_before_mb": round(before, 1), "peak_growth_mb": round(peak - before, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--phase", type=int, choices=[0, 1], help=argparse.SUPPRESS)  # the child process's side
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase is not None:
        print(json.dumps(phase(Path(args.dir), args.phase)))
        return {}
    from benchmarks.device import cpu_name
    from benchmarks.pool_scale import write_pool
    from pipeline.data import pool_from_config
    from pipeline.preflight import DATA_SEED
    from pipeline.tasks import demo

    with tempfile.TemporaryDirectory(prefix="deft-round-memory-") as tmp:
        work = Path(tmp)
        write_pool(work / "pool.jsonl", args.rows)
        t0 = time.perf_counter()
        pool_from_config(config(work).data, demo(), DATA_SEED, require_label=True)  # as the run opens it
        print(f"pool of {args.rows:,} rows written and loaded in {time.perf_counter() - t0:.0f} s", flush=True)
        rounds = []
        for k in (0, 1):
            out = subprocess.run([sys.executable, "-m", "benchmarks.round_memory", "--phase", str(k), "--dir", tmp],
                                 check=True, capture_output=True, text=True).stdout
            rounds.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rounds[-1]), flush=True)
    result = {"benchmark": "round_memory", "rows": args.rows,
              "peak_growth_mb": max(r["peak_growth_mb"] for r in rounds),
              "peak_growth_bytes_per_row": round(max(r["peak_growth_mb"] for r in rounds) * 2**20 / args.rows, 1),
              "cpu": cpu_name(),
              "rounds": rounds}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
