"""The driver's memory on a large pool through the loop's own code (`ActiveLearningRun`), with no model: a
stand-in scorer writes the score file a real scorer would (every column of a verbalizer task, in the asked
order).

    python -m benchmarks.round_memory --rows 2000000
    python -m benchmarks.round_memory --rows 10000000     # the issue's 10M rows, measured, ~6 min

A JSONL pool of --rows distinct questions is written. Then, each in a fresh process so that each peak is
its own:
  load     the pool validated into the Parquet pool cache (as the first run on a source does), then opened
  round 0  u_base over the whole pool (to the run's base cache), the cold-start pick, the simulated oracle
  round 1  u_base read back from the cache, u_lora over the unlabelled rows, the STAR mix, scores.parquet,
           the top b, the simulated oracle
Each process reports its peak RSS growth over its RSS before the pool is loaded or opened (the open pool
is part of the peak), and its peak RSS in absolute terms: that one includes the interpreter and its imports (torch, pyarrow), but not
a Ray core worker (benchmarks.pool_scale has the whole driver, Ray included). The last line printed is one
JSON object.
"""
from __future__ import annotations

import argparse
import importlib
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


def load_phase(work: Path) -> dict:
    """The pool validated from JSONL into the pool cache, then opened as a run opens it."""
    importlib.import_module("pipeline.loop")  # a run's imports, torch among them, before the mark
    from pipeline.data import pool_from_config
    from pipeline.preflight import DATA_SEED
    from pipeline.tasks import demo

    reset_peak()
    before = status_mb("VmRSS")
    t0 = time.perf_counter()
    pool = pool_from_config(config(work).data, demo(), DATA_SEED, require_label=True)
    return {"phase": "load", "rows": len(pool), "seconds": round(time.perf_counter() - t0, 1),
            "rss_before_mb": round(before, 1), "peak_growth_mb": round(status_mb("VmHWM") - before, 1),
            "peak_rss_mb": round(status_mb("VmHWM"), 1)}


def phase(work: Path, k: int) -> dict:
    """Round k's scoring, selecting and labelling phases in this process. Its peak is the process's
    high-water RSS over opening the pool and the phases, less its RSS just before the pool opened (the
    open pool is part of a round's cost: the loop releases Arrow's freed memory once it is open, so a
    mark taken after the open would move with that release, not with the round)."""
    import pyarrow as pa

    from pipeline.io import release_arrow_memory, write_parquet
    from pipeline.loop import ActiveLearningRun
    from pipeline.run_dir import LABELED_SCHEMA

    run = ActiveLearningRun(config(work), work / "run", scorer=StandInScorer(), say_logs=False)
    run.run_dir.path.mkdir(parents=True, exist_ok=True)
    run._adapter_state = lambda k: {}
    reset_peak()
    before = status_mb("VmRSS")
    if k == 1:  # round 0's picks are labelled
        ids = run.pool.ids.slice(0, run.cfg.al.initial_size)
        write_parquet(run.run_dir.labeled_file, pa.table({
            "example_id": ids, "label": pa.array(["true"] * len(ids)), "round_added": pa.array([0] * len(ids), pa.int32()),
            "source": pa.array(["oracle"] * len(ids))}, schema=LABELED_SCHEMA))
    len(run.pool)  # opened as a run opens it: ids and prompt lengths
    opened = status_mb("VmRSS")
    t0, peaks = time.perf_counter(), {}
    for name in ("scoring", "selecting", "labeling"):
        getattr(run, f"_{name}")(k)
        release_arrow_memory()  # as the loop's _drive does after every phase
        peaks[name] = round(status_mb("VmHWM") - before, 1)  # the high-water mark so far
    labelled = run.run_dir.read_labeled().num_rows
    expected = run.cfg.al.initial_size + (run.cfg.al.batch_size if k == 1 else 0)
    if labelled != expected:
        raise AssertionError(f"round {k} labelled {labelled} rows in all, expected {expected}")
    return {"phase": f"round {k}", "round": k, "rows": len(run.pool), "seconds": round(time.perf_counter() - t0, 1),
            "rss_before_mb": round(before, 1), "open_pool_growth_mb": round(opened - before, 1),
            "peak_growth_mb": round(status_mb("VmHWM") - before, 1),
            "peak_growth_by_phase_mb": peaks, "peak_rss_mb": round(status_mb("VmHWM"), 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--phase", choices=["load", "0", "1"], help=argparse.SUPPRESS)  # the child process's side
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase is not None:
        out = load_phase(Path(args.dir)) if args.phase == "load" else phase(Path(args.dir), int(args.phase))
        print(json.dumps(out))
        return {}
    from benchmarks.device import cpu_name
    from benchmarks.pool_scale import write_pool

    with tempfile.TemporaryDirectory(prefix="deft-round-memory-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        write_pool(work / "pool.jsonl", args.rows)
        print(f"pool of {args.rows:,} rows written in {time.perf_counter() - t0:.0f} s", flush=True)
        phases = []
        for name in ("load", "0", "1"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.round_memory", "--phase", name, "--dir", tmp],
                                 check=True, stdout=subprocess.PIPE, text=True).stdout
            phases.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(phases[-1]), flush=True)
    load, rounds = phases[0], phases[1:]
    growth = max(r["peak_growth_mb"] for r in rounds)
    result = {"benchmark": "round_memory", "rows": args.rows,
              "peak_growth_mb": growth,
              "peak_growth_bytes_per_row": round(growth * 2**20 / args.rows, 1),
              "load_peak_growth_bytes_per_row": round(load["peak_growth_mb"] * 2**20 / args.rows, 1),
              "peak_rss_mb": max(r["peak_rss_mb"] for r in phases),
              "cpu": cpu_name(),
              "load": load, "rounds": rounds}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
