"""The driver's memory for a base-scoring call, without a model: synthetic scorer parts, merged the way
the loop merges them now (streamed to the run's cache, one column read back) against the way it did
(every column read back, concatenated, and written by the driver).

    python -m benchmarks.driver_memory --rows 2000000

Each way runs in a fresh process, so each peak RSS is its own. The parts have the real columns of a
verbalizer task (ids, five measures, the class probabilities, the answer, its confidence, the token
count), 4,096 rows a part as the scorers write them. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PART_ROWS = 4096


def write_parts(folder: Path, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, rows, PART_ROWS)):
        n = min(PART_ROWS, rows - start)
        p = rng.random(n)
        pq.write_table(pa.table({
            "example_id": [f"{i:016x}" for i in range(start, start + n)],
            **{m: rng.random(n) for m in ("entropy", "bald", "least_confidence", "margin", "pe")},
            "probs": pa.array(np.stack([p, 1 - p], 1).tolist(), pa.list_(pa.float64())),
            "prediction": np.where(p > 0.5, "true", "false"),
            "confidence": np.maximum(p, 1 - p),
            "n_tokens": rng.integers(10, 40, n),
        }), folder / f"part-{index:06d}.parquet")


def merge(way: str, parts: Path, cache: Path) -> dict:
    """One base call's driver work, the old way or the new; returns this process's peak RSS growth."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.io import write_parquet
    from pipeline.scoring import _read_parts, in_order, stream_into

    files = sorted(parts.glob("part-*.parquet"))
    ids = pa.concat_arrays([pq.read_table(f, columns=["example_id"]).column("example_id").combine_chunks() for f in files])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pool = pa.default_memory_pool()
    arrow_before = pool.bytes_allocated()
    t0 = time.perf_counter()
    if way == "old":  # every column back to the driver, which writes the cache and keeps what the loop needs
        scores = _read_parts(parts, None)
        write_parquet(cache, scores)
        scores = scores.filter(pc.is_in(scores.column("example_id"), value_set=ids))
        u = in_order(scores, ids).column("entropy")
    else:  # the parts streamed into the cache, one column read back and placed in one lookup
        stream_into(cache, [(f, None) for f in files])
        held = pq.read_table(cache, columns=["example_id", "entropy"])
        u = held.take(pc.index_in(ids, value_set=held.column("example_id"))).column("entropy")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # RSS is a high-water mark that imports may already have set (small pools then show no growth); Arrow's
    # own pool counts exactly the bytes the merge allocated at its peak.
    return {"way": way, "rows": len(u), "seconds": round(time.perf_counter() - t0, 2),
            "driver_rss_before_mb": round(before, 1), "driver_peak_growth_mb": round(peak - before, 1),
            "arrow_peak_mb": round((pool.max_memory() - arrow_before) / 2**20, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--way", choices=["old", "new"], help=argparse.SUPPRESS)  # the child process's side
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.way:
        print(json.dumps(merge(args.way, Path(args.dir) / "parts", Path(args.dir) / f"cache-{args.way}.parquet")))
        return {}
    with tempfile.TemporaryDirectory(prefix="deft-driver-memory-") as tmp:
        write_parts(Path(tmp) / "parts", args.rows)
        ways = {}
        for way in ("old", "new"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.driver_memory", "--way", way, "--dir", tmp],
                                 check=True, capture_output=True, text=True).stdout
            ways[way] = json.loads(out.strip().splitlines()[-1])
    growth = {w: r["driver_peak_growth_mb"] for w, r in ways.items()}
    arrow = {w: r["arrow_peak_mb"] for w, r in ways.items()}
    result = {"benchmark": "driver_memory", "rows": args.rows, **{f"{w}_peak_growth_mb": g for w, g in growth.items()},
              **{f"{w}_arrow_peak_mb": a for w, a in arrow.items()},
              "old_arrow_bytes_per_row": round(arrow["old"] * 2**20 / args.rows, 1),
              "new_arrow_bytes_per_row": round(arrow["new"] * 2**20 / args.rows, 1), "ways": ways}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
