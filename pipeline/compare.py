"""`deft compare`: strategies side by side over seeds, and how many labels each saves against random.

    deft compare configs/quickstart.yaml --strategies random,entropy,bald,star --seeds 0,1,2 --out runs/cmp
    deft compare configs/quickstart.yaml --strategies random,star,star+st --seeds 0,1,2 --out runs/list  # + LiST

    from pipeline.compare import compare
    summary = compare(cfg, ["random", "star"], [0, 1, 2], "runs/cmp")

Every (strategy, seed) is a normal run directory, DIR/<strategy>-seed<seed>, so each one resumes on its
own and running the same command again resumes the comparison: finished runs are read, unfinished ones
continue. Runs share what does not depend on them: the scoring actors (their model stays loaded; the
seed travels with each call) and the frozen base model's scores (DIR/base_scores.parquet).

Lanes: on a cluster with several GPUs, `parallel` runs go at once, each on its own scorers and its own
1-GPU resource plan; on a laptop or a single GPU, runs go one after another.

Label saving: random's final mean accuracy is the target; a strategy's saving is the number of labels
its mean curve needs to reach that target (linear between evaluated rounds) as a % of the labels
random's own mean curve needs.
"""
from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import yaml

from pipeline.config import Config, ConfigError, check_strategy, from_dict, to_dict
from pipeline.io import write_json, write_text
from pipeline.report import aulc, curve_points, evaluated_points, one_answer, save_figure
from pipeline.run_dir import PHASES, RunDir

log = logging.getLogger(__name__)
PHASE_TIMES = [f"{p}_s" for p in PHASES[:-1]]


SELF_TRAINING_SUFFIX = "+st"
UNRECORDED = "not recorded"  # a metrics line written before deft named the machine (compare.json's key)


def run_config(cfg: Config, strategy: str, seed: int) -> Config:
    """The base config with one strategy and seed, validated like any config. `<strategy>+st` turns LiST
    self-training on (with the config's self_training settings); a plain name turns it off, so every
    curve of a comparison says what it is."""
    data = to_dict(cfg)
    name, st = (strategy[: -len(SELF_TRAINING_SUFFIX)], True) if strategy.endswith(SELF_TRAINING_SUFFIX) else (strategy, False)
    data["al"]["strategy"], data["seed"] = name, seed
    data["self_training"]["enabled"] = st
    if name not in ("star", "subtract"):
        data["al"]["measure"] = "auto"  # al.measure only chooses what star/subtract mix
    return from_dict(Config, data)


def run_dir_name(strategy: str, seed: int) -> str:
    return f"{strategy}-seed{seed}"


def _check_plan(cfg: Config, strategies: list[str], seeds: list[int]) -> dict[tuple[str, int], Config]:
    if not strategies:
        raise ConfigError("compare: --strategies should name at least one strategy")
    if not seeds:
        raise ConfigError("compare: --seeds should name at least one seed")
    if len(set(strategies)) != len(strategies) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"compare: strategies and seeds should be distinct, got {strategies} and {seeds}")
    configs = {}
    for s in strategies:
        for seed in seeds:
            configs[(s, seed)] = run_config(cfg, s, seed)
            check_strategy(configs[(s, seed)].al, cfg.task.task_kind, cfg.scoring.mc_passes)
    return configs


def _check_existing(out: Path, configs: dict[tuple[str, int], Config]) -> None:
    """A run directory already under `out` must hold the run this comparison would start."""
    for (s, seed), cfg in configs.items():
        rd = RunDir(out / run_dir_name(s, seed))
        if rd.config_file.is_file() and to_dict(rd.read_config()) != to_dict(cfg):
            raise ConfigError(f"{rd.path} holds a run of another config; compare into a new --out, "
                              f"or use the config that run was started with ({rd.config_file})")


def compare(
    cfg: Config,
    strategies: list[str],
    seeds: list[int],
    out: str | Path,
    parallel: Optional[int] = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run (or resume) every strategy x seed under `out`, write compare.md / compare.png / compare.json,
    and return the summary (also the last line `deft compare` prints)."""
    from cluster.runtime import logs_dir
    from pipeline.loop import ActiveLearningRun
    from pipeline.preflight import preflight
    from pipeline.tasks import get_task

    out = Path(out)
    configs = _check_plan(cfg, strategies, seeds)
    _check_existing(out, configs)
    if parallel is not None and parallel < 1:
        raise ConfigError(f"compare: --parallel should be >= 1, got {parallel}")
    if parallel is not None and parallel > 1 and cfg.train.backend == "local":
        raise ConfigError("compare: --parallel > 1 needs train.backend=ray: in-process training runs in the "
                          "driver, and concurrent runs there would share its random state")
    preflight(cfg, get_task(cfg.task), need_labels=cfg.al.oracle == "simulated")  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "compare.yaml", yaml.safe_dump(
        {"strategies": strategies, "seeds": seeds, "config": to_dict(cfg)}, sort_keys=False))
    t0 = time.perf_counter()
    todo = []
    for key, run_cfg in configs.items():
        if _done(out / run_dir_name(*key)):
            echo(f"[compare] {run_dir_name(*key)}: already done")
        else:
            todo.append((key, run_cfg))
    lanes = _lanes(cfg, parallel, len(todo))
    queue = list(todo)
    lock = threading.Lock()
    said_logs: list = []

    def lane(index: int) -> None:
        scorer = None
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    (strategy, seed), run_cfg = queue.pop(0)
                if scorer is None:
                    scorer = _scorer(run_cfg, lanes)
                name = run_dir_name(strategy, seed)
                echo(f"[compare] {name}: {'resuming' if RunDir(out / name).exists() else 'starting'}")
                if not said_logs:
                    said_logs.append(True)
                    where = logs_dir()
                    echo(f"[compare] logs: {out}/<run>/logs/driver.log" + (f"; Ray's worker logs: {where}" if where else ""))
                run = ActiveLearningRun(run_cfg, out / name, scorer=scorer, base_cache=out / "base_scores.parquet",
                                        echo=lambda line, name=name: echo(f"[compare] {name}: {line}"), say_logs=False)
                t = time.perf_counter()
                run.resume() if run.run_dir.exists() else run.run()
                echo(f"[compare] {name}: done in {time.perf_counter() - t:.0f}s; {_last(run.run_dir)}")
        finally:
            if scorer is not None:
                scorer.shutdown()

    if lanes == 1:
        lane(0)
    else:
        with ThreadPoolExecutor(lanes) as pool:
            for f in [pool.submit(lane, i) for i in range(lanes)]:
                f.result()
    summary = summarize(out, strategies, seeds)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json(out / "compare.json", summary)
    write_text(out / "compare.md", render_markdown(summary))
    plot_comparison(summary, out / "compare.png")
    return summary


def _done(path: Path) -> bool:
    rd = RunDir(path)
    return rd.exists() and rd.read_state().phase == "done"


def _last(rd: RunDir) -> str:
    m = rd.read_metrics()
    if not m or m[-1].get("accuracy") is None:
        return "no evaluation"
    return f"{m[-1]['labels']} labels, accuracy {m[-1]['accuracy']:.3f}"


def _lanes(cfg: Config, parallel: Optional[int], runs: int) -> int:
    if parallel is not None:
        return max(1, min(parallel, runs))
    if runs <= 1:
        return 1
    from cluster.runtime import connect

    ray = connect(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.temp_dir)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 2 or cfg.train.backend == "local":
        return 1  # CPU, one GPU, or in-process training: one run after another
    return max(1, min(gpus, runs))  # one lane per GPU


def _scorer(cfg: Config, lanes: int):
    """Scoring actors for one lane. With several lanes each gets an even slice of the cluster."""
    from actors.model import resolve_model_path
    from cluster.plan import plan_resources
    from cluster.runtime import connect
    from pipeline.scoring import PoolScorer

    ray = connect(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.temp_dir)
    plan = None
    if lanes > 1:
        share = {k: v / lanes for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        plan = plan_resources(share, cfg.scoring.num_actors, cfg.cluster.scorer_cpus, cfg.train.num_workers)
    return PoolScorer(cfg, resolve_model_path(cfg.model), plan=plan)


# ---- the summary -------------------------------------------------------------------------------------
def _mean_sd(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


def _run_curve(rd: RunDir) -> dict[int, dict]:
    """labels -> {accuracy, ece} for every evaluated point of one run (the base model at 0 labels)."""
    return {x: {"accuracy": acc, "ece": ece} for x, acc, ece in evaluated_points(rd)}


def _phase_seconds(rd: RunDir, phase: str) -> float:
    """Seconds a run spent in one phase over all its rounds (rounds/k/timings.json, written as each phase
    ends; metrics.jsonl is written inside the evaluating phase, so it cannot hold that phase's time)."""
    rounds = rd.path / "rounds"
    files = [d / "timings.json" for d in rounds.iterdir() if (d / "timings.json").is_file()] if rounds.is_dir() else []
    return sum(json.loads(f.read_text()).get(phase) or 0.0 for f in files)


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> Optional[float]:
    """The first label count at which a (labels, accuracy) curve reaches `target`, linear between points."""
    for i, (x, y) in enumerate(curve):
        if y >= target:
            if i == 0:
                return float(x)
            x0, y0 = curve[i - 1]
            return x0 + (x - x0) * (target - y0) / (y - y0)
    return None


def summarize(out: Path, strategies: list[str], seeds: list[int]) -> dict:
    curves, aulcs, phases = {}, {}, {}
    for s in strategies:
        runs = [RunDir(out / run_dir_name(s, seed)) for seed in seeds]
        per_run = [_run_curve(rd) for rd in runs]
        labels = sorted(set().union(*per_run)) if per_run else []
        curves[s] = [{"labels": x, "accuracy": _mean_sd([r[x]["accuracy"] for r in per_run if x in r]),
                      "ece": _mean_sd([r[x]["ece"] for r in per_run if x in r])} for x in labels]
        aulcs[s] = _mean_sd([aulc(curve_points(rd)) for rd in runs])
        phases[s] = {p: _mean_sd([_phase_seconds(rd, p) for rd in runs])["mean"] for p in PHASE_TIMES}
        # Part of training_s: LiST's pseudo-labelling, student and gold fine-tunes, summed over rounds.
        phases[s]["self_training_s"] = _mean_sd([sum((m.get("self_training") or {}).get("seconds", 0.0)
                                                     for m in rd.read_metrics()) for rd in runs])["mean"]
    summary = {"strategies": strategies, "seeds": seeds, "curves": curves, "aulc": aulcs, "phase_s": phases,
               "machines": _machines(out, strategies, seeds), "one_answer": _one_answer(out, strategies, seeds)}
    summary.update(_label_saving(curves))
    return summary


def _machines(out: Path, strategies: list[str], seeds: list[int]) -> dict[str, list[str]]:
    """Each machine the comparison's rounds were computed on (cluster.runtime.machine), with the runs that
    used it: a comparison resumed elsewhere, or whose arms ran on different CPUs, says so."""
    used: dict[str, list[str]] = {}
    for s in strategies:
        for seed in seeds:
            name = run_dir_name(s, seed)
            for m in RunDir(out / name).read_metrics():
                runs = used.setdefault(m.get("machine") or UNRECORDED, [])
                if name not in runs:
                    runs.append(name)
    return used


def _one_answer(out: Path, strategies: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    """Per strategy, the evaluated adapters that gave one answer for every test row: their accuracy is
    that class's share of the test split (the prior), not something learnt from the labels."""
    found: dict[str, list[dict]] = {s: [] for s in strategies}
    for s in strategies:
        for seed in seeds:
            for m in RunDir(out / run_dir_name(s, seed)).read_metrics():
                if (answer := one_answer(m)) is not None:
                    found[s].append({"run": run_dir_name(s, seed), "labels": m["labels"], "answer": answer})
    return found


def _one_answer_lines(summary: dict) -> list[str]:
    """'star: star-seed1 at 32, 64 labels ("true")' per strategy with such adapters; [] when none."""
    lines = []
    for s, points in (summary.get("one_answer") or {}).items():
        runs: dict[tuple[str, str], list[str]] = {}
        for p in points:
            runs.setdefault((p["run"], p["answer"]), []).append(str(p["labels"]))
        if runs:
            lines.append(f"{s}: " + "; ".join(f"{r} at {', '.join(xs)} labels ({a!r})" for (r, a), xs in runs.items()))
    return lines


def _label_saving(curves: dict[str, list[dict]]) -> dict:
    """Labels each strategy's mean curve needs to reach random's final mean accuracy, and as % of random's."""
    if "random" not in curves or not curves["random"]:
        return {"target_accuracy": None, "label_saving": {}}
    target = curves["random"][-1]["accuracy"]["mean"]
    mean_curve = {s: [(p["labels"], p["accuracy"]["mean"]) for p in c] for s, c in curves.items()}
    random_needs = labels_to_reach(mean_curve["random"], target)
    if not random_needs:  # reached at 0 labels: the base model was already as good as random ever got
        base = mean_curve["random"][0][1]
        none = {"labels": None, "pct_of_random": None, "saving_pct": None}
        return {"target_accuracy": target, "label_saving": {s: dict(none) for s in mean_curve},
                "label_saving_note": f"not measurable: random's final mean accuracy ({target:.3f}) does not beat the "
                                     f"base model's ({base:.3f}), so reaching it takes no labels"}
    saving = {}
    for s, curve in mean_curve.items():
        needs = labels_to_reach(curve, target)
        pct = 100.0 * needs / random_needs if needs is not None and random_needs else None
        saving[s] = {"labels": needs, "pct_of_random": pct, "saving_pct": None if pct is None else 100.0 - pct}
    saving["random"] = {"labels": random_needs, "pct_of_random": 100.0, "saving_pct": 0.0}  # exact, not 1e-14 off
    out = {"target_accuracy": target, "label_saving": saving}
    final_labels = mean_curve["random"][-1][0]
    if random_needs < final_labels:  # random's mean curve got to its final accuracy before its last point
        out["label_saving_caveat"] = (
            f"random's mean curve first reaches its final accuracy {target:.3f} at {random_needs:.1f} labels, before "
            f"its last point ({final_labels} labels). Savings are "
            f"counted against {random_needs:.1f} labels, so a negative saving means 'reached it later than random "
            f"first did', not 'needed more labels than random's whole budget'; compare the curves and AULC too")
    return out


def _pm(stat: dict, spec: str = ".3f") -> str:
    if stat.get("mean") is None:
        return "—"
    return f"{stat['mean']:{spec}} ± {stat['sd']:{spec}}"


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{round(value)}%"  # None: random's own curve starts at the target; round: no "-0%"


def render_markdown(summary: dict) -> str:
    strategies, seeds = summary["strategies"], summary["seeds"]
    labels = sorted({p["labels"] for s in strategies for p in summary["curves"][s]})
    by = {s: {p["labels"]: p for p in summary["curves"][s]} for s in strategies}
    head = "| labels | " + " | ".join(strategies) + " |\n|---:|" + "---:|" * len(strategies)

    def table(metric: str) -> list[str]:
        rows = [head]
        for x in labels:
            cells = [_pm(by[s][x][metric]) if x in by[s] else "—" for s in strategies]
            rows.append(f"| {x} | " + " | ".join(cells) + " |")
        return rows

    lines = [f"# deft compare: {', '.join(strategies)} over seeds {', '.join(map(str, seeds))}", "",
             _machines_line(summary.get("machines") or {}), "",
             "Mean ± sd over seeds (0 labels: the base model).", "", "## Accuracy", "", *table("accuracy"),
             "", "## ECE", "", *table("ece"), "", "## Area under the learning curve", "",
             "| strategy | AULC |", "|---|---:|"]
    lines += [f"| {s} | {_pm(summary['aulc'][s])} |" for s in strategies]
    lines += ["", "## Label saving", ""]
    if summary["target_accuracy"] is None:
        lines.append("Needs `random` among the strategies: the saving is measured against it.")
    elif summary.get("label_saving_note"):
        lines.append(f"Label saving is {summary['label_saving_note']}.")
    else:
        lines += [f"Labels each mean curve needs to reach random's final mean accuracy "
                  f"({summary['target_accuracy']:.3f}), as a % of what random's own curve needs.", ""]
        if summary.get("label_saving_caveat"):
            lines += [f"Note: {summary['label_saving_caveat']}.", ""]
        lines += ["| strategy | labels | % of random | saving |", "|---|---:|---:|---:|"]
        for s in strategies:
            ls = summary["label_saving"][s]
            if ls["labels"] is None:
                lines.append(f"| {s} | not reached | — | — |")
            else:
                lines.append(f"| {s} | {ls['labels']:.1f} | {_pct(ls['pct_of_random'])} | {_pct(ls['saving_pct'])} |")
    one = _one_answer_lines(summary)
    lines += ["", "## Adapters that answered one class", "",
              *(["An adapter that gives every test row the same answer scores that class's share of the test "
                 "rows, not what it learnt from the labels:", "", *[f"- {x}" for x in one]] if one else
                ["None. Answers are counted on verbalizer tasks, in rounds evaluated since deft counts them."])]
    lines += ["", "## Wall time per phase (seconds per run, mean over seeds)", "",
              "Self-training (LiST) is part of training.", "",
              "| strategy | " + " | ".join(p[:-2] for p in PHASE_TIMES) + " | total | of which self-training |",
              "|---|" + "---:|" * (len(PHASE_TIMES) + 2)]
    for s in strategies:
        t = summary["phase_s"][s]
        lines.append(f"| {s} | " + " | ".join(f"{t[p] or 0:.1f}" for p in PHASE_TIMES)
                     + f" | {sum(t[p] or 0 for p in PHASE_TIMES):.1f} | {t.get('self_training_s') or 0:.1f} |")
    return "\n".join(lines) + "\n"


def _known(machines: dict[str, list[str]]) -> dict[str, list[str]]:
    return {m: runs for m, runs in machines.items() if m != UNRECORDED}


def _machines_line(machines: dict[str, list[str]]) -> str:
    known = _known(machines)
    if len(known) <= 1:
        line = f"Computed on: {next(iter(known), 'no machine recorded')}."
    else:
        line = ("Computed on more than one machine, and results can differ between machines: "
                + "; ".join(f"{m} ({', '.join(runs)})" for m, runs in known.items()) + ".")
    if UNRECORDED in machines and known:
        line += f" Not recorded for some rounds (run before deft named the machine) of: {', '.join(machines[UNRECORDED])}."
    return line


def print_table(summary: dict, echo: Callable[[str], None] = print) -> None:
    """The console view: mean accuracy per label count and strategy, AULC, label saving."""
    strategies = summary["strategies"]
    labels = sorted({p["labels"] for s in strategies for p in summary["curves"][s]})
    by = {s: {p["labels"]: p["accuracy"] for p in summary["curves"][s]} for s in strategies}
    width = max(15, *(len(s) + 2 for s in strategies))
    echo("accuracy, mean ± sd over seeds " + ", ".join(map(str, summary["seeds"])))
    echo(_machines_line(summary.get("machines") or {}))
    echo(f"{'labels':>6} " + "".join(f"{s:>{width}}" for s in strategies))
    for x in labels:
        echo(f"{x:>6} " + "".join(f"{_pm(by[s][x]) if x in by[s] else '—':>{width}}" for s in strategies))
    echo(f"{'AULC':>6} " + "".join(f"{_pm(summary['aulc'][s]):>{width}}" for s in strategies))
    for line in _one_answer_lines(summary):
        echo(f"one answer for every test row: {line}")
    if summary.get("label_saving_note"):
        echo(f"label saving: {summary['label_saving_note']}")
    elif summary["target_accuracy"] is not None:
        echo(f"label saving (labels to reach random's final accuracy {summary['target_accuracy']:.3f}):")
        if summary.get("label_saving_caveat"):
            echo(f"  note: {summary['label_saving_caveat']}.")
        for s in strategies:
            ls = summary["label_saving"][s]
            echo(f"  {s}: " + ("not reached" if ls["labels"] is None else
                              f"{ls['labels']:.1f} labels = {_pct(ls['pct_of_random'])} of random's ({_pct(ls['saving_pct'])} saved)"))


def plot_title(summary: dict) -> str:
    """Seeds and machine, so a plot passed around on its own still says what it was computed on."""
    known = list(_known(summary.get("machines") or {}))
    where = known[0] if len(known) == 1 else f"{len(known)} machines (compare.md)" if known else "machine not recorded"
    return f"{len(summary['seeds'])} seed(s) · {where}"


def plot_comparison(summary: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for s in summary["strategies"]:
        pts = [p for p in summary["curves"][s] if p["accuracy"]["mean"] is not None]
        if not pts:
            continue
        x = [p["labels"] for p in pts]
        y = [p["accuracy"]["mean"] for p in pts]
        sd = [p["accuracy"]["sd"] for p in pts]
        line, = ax.plot(x, y, marker="o", label=f"{s} (AULC {_pm(summary['aulc'][s])})")
        ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)], color=line.get_color(), alpha=0.2)
    if summary["target_accuracy"] is not None:
        ax.axhline(summary["target_accuracy"], color="grey", linestyle="--", linewidth=1, label="random's final accuracy")
    ax.set_xlabel("labelled examples")
    ax.set_ylabel("test accuracy (mean ± sd over seeds)")
    ax.set_title(plot_title(summary), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out)
