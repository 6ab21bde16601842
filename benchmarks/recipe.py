"""Training-recipe sweep: which knobs make a small model learn from few labels, measured with `deft compare`.

    python -m benchmarks.recipe configs/quickstart.yaml --grid train.min_steps=0,32 --grid train.lr=3e-4,1e-3 \
        --strategies random --seeds 0,1,2 --out runs/recipe-demo

Every grid point (the cartesian product of the --grid lists) is one `deft compare` of --strategies over
--seeds in OUT/<point>/, so the sweep resumes like a comparison does. Per point it reports, per strategy:
final mean accuracy ± sd, AULC ± sd, whether the mean curve is stable (no round-to-round fall larger than
the later point's sd), and the mean accuracy at the first label count >= --check-labels against the base
model's, and how many runs' final adapter gave one answer for every test row (it scored the class prior).
The last line is one JSON object with all of it and the CPU it ran on.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from benchmarks.device import cpu_name
from pipeline.compare import compare, run_dir_name
from pipeline.config import load_config, parse_override
from pipeline.report import one_answer
from pipeline.run_dir import RunDir


def grid_points(grids: list[str]) -> list[list[str]]:
    """["a=1,2", "b=x"] -> [["a=1", "b=x"], ["a=2", "b=x"]]"""
    axes = []
    for g in grids:
        key, _, values = g.partition("=")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(p) for p in itertools.product(*axes)] if axes else [[]]


def point_name(overrides: list[str]) -> str:
    # the key's last part and the whole value: "train.warmup_ratio=0.3" -> "warmup_ratio-0.3" (splitting the
    # whole override on "." named that point "3")
    return "_".join(f"{k.split('.')[-1]}-{v}" for k, _, v in (o.partition("=") for o in overrides)) or "defaults"


def stability(curve: list[dict]) -> dict:
    """The largest round-to-round fall of the mean curve, and whether every fall is within the later sd."""
    worst, stable = 0.0, True
    for a, b in zip(curve, curve[1:]):
        fall = a["accuracy"]["mean"] - b["accuracy"]["mean"]
        worst = max(worst, fall)
        stable &= fall <= (b["accuracy"]["sd"] or 0.0) + 1e-12
    return {"worst_fall": worst, "stable": stable}


def at_labels(curve: list[dict], labels: int) -> dict | None:
    for p in curve:
        if p["labels"] >= labels:
            return {"labels": p["labels"], "accuracy": p["accuracy"]["mean"]}
    return None


def final_one_answer(point_dir: Path, strategy: str, seeds: list[int]) -> list[str]:
    """The runs whose last evaluated adapter gave one answer for every test row: it scored the class prior."""
    runs = []
    for seed in seeds:
        name = run_dir_name(strategy, seed)
        evaluated = [m for m in RunDir(point_dir / name).read_metrics() if m.get("accuracy") is not None]
        if evaluated and one_answer(evaluated[-1]) is not None:
            runs.append(name)
    return runs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a swept field")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="a fixed field")
    p.add_argument("--strategies", default="random")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", required=True)
    p.add_argument("--check-labels", type=int, default=64, help="compare with the base model at this many labels")
    args = p.parse_args(argv)
    for g in args.grid:
        parse_override(g)  # a malformed --grid fails before anything runs
    strategies = args.strategies.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    points = grid_points(args.grid)
    configs = {point_name(o): (o, load_config(args.config, args.overrides + o)) for o in points}  # validate all first
    results, t0 = {}, time.perf_counter()
    for name, (overrides, cfg) in configs.items():
        print(f"[recipe] {name}: {' '.join(overrides) or '(defaults)'}", flush=True)
        summary = compare(cfg, strategies, seeds, Path(args.out) / name)
        results[name] = {"overrides": overrides, "wall_s": summary["wall_s"], "strategies": {}}
        for s in strategies:
            curve = summary["curves"][s]
            base = curve[0]["accuracy"]["mean"] if curve and curve[0]["labels"] == 0 else None
            check = at_labels(curve, args.check_labels)
            results[name]["strategies"][s] = {
                "final": curve[-1]["accuracy"], "aulc": summary["aulc"][s], **stability(curve),
                "base_accuracy": base, "at_check": check,
                "beats_base_at_check": None if base is None or check is None else check["accuracy"] > base,
                "train_s_per_run": summary["phase_s"][s]["training_s"],
                "final_one_answer": final_one_answer(Path(args.out) / name, s, seeds),
            }
    print(f"\n{'point':<40} {'strategy':<9} {'final acc':>15} {'AULC':>15} {'worst fall':>10} {'stable':>6} "
          f"{'@' + str(args.check_labels) + ' vs base':>14} {'train s':>8} {'one answer':>10}")
    for name, r in results.items():
        for s, m in r["strategies"].items():
            f, a = m["final"], m["aulc"]
            check = "—" if m["at_check"] is None else f"{m['at_check']['accuracy']:.3f}/{m['base_accuracy'] or 0:.3f}"
            print(f"{name:<40} {s:<9} {f['mean']:.3f} ± {f['sd']:.3f}  {a['mean']:.3f} ± {a['sd']:.3f} "
                  f"{m['worst_fall']:>10.3f} {str(m['stable']):>6} {check:>14} {m['train_s_per_run'] or 0:>8.0f} "
                  f"{len(m['final_one_answer']):>4} of {len(seeds)}")
    out = {"benchmark": "recipe", "config": args.config, "fixed": args.overrides, "seeds": seeds, "cpu": cpu_name(),
           "wall_s": round(time.perf_counter() - t0, 1), "points": results}
    print(json.dumps(out, sort_keys=True))
    return out


if __name__ == "__main__":
    main()
