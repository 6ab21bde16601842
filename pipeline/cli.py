"""The `deft` command.

    deft run CONFIG [--set key=value ...] [--run-dir DIR]   start an active-learning run
    deft resume RUN [--set key=value ...]                  continue a killed or waiting run (--set: paths, cluster)
    deft status RUN                                        where a run is, and its metrics so far
    deft label export RUN [--format F] [--out FILE]        (human oracle) the file to fill in; F: jsonl,
                                                           label-studio, argilla
    deft label import RUN FILE [--allow-partial]           (human oracle) validate and take labels
    deft report RUN [RUN ...]                              report.md, learning_curve.png, AULC
    deft score CONFIG [--set ...] [--out FILE]             score a pool once and show the most uncertain
    deft compare CONFIG --strategies random,star --seeds 0,1,2 --out DIR
                                                           strategies side by side over seeds; label saving
    deft quickstart [--set ...]                            random vs STAR on the embedded model, offline
    deft bench scoring|training|recipe [ARGS ...]          benchmarks (see benchmarks/)

On a cluster, `ray job submit --working-dir . -- deft run CONFIG` joins the job's cluster (RAY_ADDRESS).
Exit codes: 0 done, 1 failed (a dead worker; the run resumes), 2 bad input (the message names the file, line or
key), 3 waiting for human labels, 130 interrupted. Errors are one `deft: error:` line; -v adds the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WAITING_FOR_LABELS = 3


class _Parser(argparse.ArgumentParser):
    """Usage errors in the one shape every deft error has: `deft: error: <subcommand>: <message>`."""

    def error(self, message):
        self.print_usage(sys.stderr)
        where = self.prog.removeprefix("deft").strip()
        self.exit(2, f"deft: error: {where + ': ' if where else ''}{message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="deft", description="Data-efficient fine-tuning: STAR active learning with LoRA on Ray")
    p.add_argument("-v", "--verbose", action="store_true", help="log every phase")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(cmd, positional=True):
        if positional:
            cmd.add_argument("config", help="YAML config (see configs/)")
        cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
        cmd.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")

    r = sub.add_parser("run", help="start an active-learning run")
    with_config(r)
    r.add_argument("--run-dir", help="where the run lives (default: runs/<config name>-<time>)")
    q = sub.add_parser("quickstart", help="random vs STAR on the embedded SmolLM2 and the demo task, offline")
    with_config(q, positional=False)
    q.add_argument("--out", default="runs/quickstart", help="the comparison's directory (default: runs/quickstart); "
                   "an unfinished one resumes")
    q.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    c = sub.add_parser("compare", help="run strategies side by side over seeds; write compare.md/.png; label saving")
    with_config(c)
    c.add_argument("--strategies", default="random,star", help="comma-separated (default: random,star); "
                   "NAME+st runs NAME with LiST self-training on (e.g. random,star,star+st)")
    c.add_argument("--seeds", default="0,1,2", help="comma-separated (default: 0,1,2)")
    c.add_argument("--out", required=True, help="the comparison's directory; running again resumes it")
    c.add_argument("--parallel", type=int, help="runs at once (default: one per GPU on multi-GPU clusters, else 1)")
    res = sub.add_parser("resume", help="continue a run from its recorded phase")
    res.add_argument("run")
    res.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="change a key that is safe to change mid-run: paths, cluster, scoring batch size")
    sub.add_parser("status", help="show a run's phase and metrics").add_argument("run")
    rep = sub.add_parser("report", help="write report.md and learning_curve.png; print AULC")
    rep.add_argument("runs", nargs="+", help="the first run gets the files; the curve has a line per run")
    lab = sub.add_parser("label", help="human labelling").add_subparsers(dest="label_command", required=True)
    ex = lab.add_parser("export", help="write the current round's file to label")
    ex.add_argument("run")
    ex.add_argument("--format", choices=["jsonl", "label-studio", "argilla"], default="jsonl",
                    help="jsonl: deft's own file; label-studio: tasks + labelling config; argilla: records")
    ex.add_argument("--out", help="write it here (jsonl: a copy; the run keeps its own)")
    im = lab.add_parser("import", help="validate a filled file (deft JSONL, Label Studio or Argilla export) and take its labels")
    im.add_argument("run")
    im.add_argument("file")
    im.add_argument("--allow-partial", action="store_true", help="continue the round with only the rows labelled so far")
    s = sub.add_parser("score", help="score a pool once and show the most uncertain examples")
    with_config(s)
    s.add_argument("--out", help="write every score to this Parquet file")
    s.add_argument("--top", type=int, default=10)
    b = sub.add_parser("bench", help="run a throughput benchmark: scoring or training")
    b.add_argument("name", choices=["scoring", "training", "recipe"])
    b.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _config(path, overrides, address):
    from pipeline.config import load_config

    cfg = load_config(path, overrides)
    if address:
        cfg.cluster.address = address
    return cfg


def _print_metrics(run_dir) -> None:
    from pipeline.report import answers_cell, aulc, curve_points
    from pipeline.run_dir import RunDir

    run = RunDir(run_dir)
    base = run.path / "base_eval.json"
    print(f"{'round':>5} {'labels':>6} {'accuracy':>8} {'ECE':>6} {'train s':>8} {'round s':>8}  test answers")
    if base.is_file():
        import json

        b = json.loads(base.read_text())
        print(f"{'base':>5} {0:>6} {b['accuracy']:8.3f} {b['ece']:6.3f} {'':>8} {'':>8}  {answers_cell(b)}")
    for m in run.read_metrics():
        t = m.get("timings", {})
        total = sum(v for k, v in t.items() if k.endswith("ing_s") and v)
        acc = f"{m['accuracy']:8.3f}" if m.get("accuracy") is not None else f"{'—':>8}"
        ece = f"{m['ece']:6.3f}" if m.get("ece") is not None else f"{'—':>6}"
        print(f"{m['round']:>5} {m['labels']:>6} {acc} {ece} {t.get('training_s', 0):8.1f} {total:8.1f}  {answers_cell(m)}")
    area = aulc(curve_points(run))
    if area is not None:
        print(f"AULC (accuracy vs labels): {area:.3f}")


def _drive(run, fresh: bool) -> int:
    from pipeline.loop import NeedsLabels
    from pipeline.report import write_report

    t0 = time.perf_counter()
    try:
        run.run() if fresh else run.resume()
    except NeedsLabels as e:
        print(str(e))
        return WAITING_FOR_LABELS
    report, curve, _ = write_report(run.run_dir)
    _print_metrics(run.run_dir.path)
    print(f"done in {time.perf_counter() - t0:.0f}s; report: {report}  curve: {curve}")
    return 0


def cmd_run(args, config_path) -> int:
    from pipeline.loop import ActiveLearningRun

    cfg = _config(config_path, args.overrides, args.address)
    name = Path(config_path).stem
    run_dir = args.run_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    args.run_dir_used = run_dir
    print(f"run dir: {run_dir}")
    return _drive(ActiveLearningRun(cfg, run_dir, echo=print), fresh=True)


def _ints(text: str, what: str) -> list[int]:
    from pipeline.config import ConfigError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{what} should be comma-separated integers, got {text!r}") from None


def cmd_compare(args, config_path, strategies: list[str], seeds: list[int], out: str) -> int:
    import json

    from pipeline.compare import compare, print_table

    cfg = _config(config_path, args.overrides, args.address)
    print(f"comparing {', '.join(strategies)} over seed(s) {', '.join(map(str, seeds))} in {out}")
    summary = compare(cfg, strategies, seeds, out, getattr(args, "parallel", None))
    print_table(summary)
    print(f"done in {summary['wall_s']:.0f}s; report: {Path(out) / 'compare.md'}  plot: {Path(out) / 'compare.png'}")
    print(json.dumps(summary, sort_keys=True))
    return 0


def cmd_resume(args) -> int:
    from pipeline.loop import ActiveLearningRun

    return _drive(ActiveLearningRun.open(args.run, args.overrides, echo=print), fresh=False)


def cmd_status(args) -> int:
    from pipeline.run_dir import RunDir

    run = RunDir(args.run)
    state, cfg = run.read_state(), run.read_config()
    labels = run.read_labeled().num_rows
    print(f"{run.path}: round {state.round}, phase {state.phase}; {labels} labels; strategy {cfg.al.strategy}, "
          f"{cfg.al.rounds} rounds planned")
    if state.phase == "labeling" and cfg.al.oracle == "human":
        print(f"waiting for labels: {run.to_label_file(state.round)}")
    _print_metrics(run.path)
    return 0


def cmd_report(args) -> int:
    from pipeline.report import aulc, curve_points, write_report
    from pipeline.run_dir import RunDir

    runs = [RunDir(r) for r in args.runs]
    for r in runs:
        r.read_config()  # a clear error for a path that is not a run
    if not any(curve_points(r) for r in runs):
        raise ValueError(f"{runs[0].path}: no round has been evaluated yet, so there is nothing to report "
                         f"(`deft status {runs[0].path}` shows where it is)")
    report, curve, _ = write_report(runs[0], runs[1:])
    for r in runs:
        area = aulc(curve_points(r))
        print(f"{r.path}: strategy {r.read_config().al.strategy}, AULC {area:.3f}" if area is not None else f"{r.path}: no evaluated round yet")
    print(f"report: {report}\ncurve: {curve}")
    return 0


def _labeling_round(run_dir):
    from pipeline.io import read_parquet
    from pipeline.loop import ActiveLearningRun

    run = ActiveLearningRun.open(run_dir)
    state = run.state
    if state.phase != "labeling" or run.cfg.al.oracle != "human":
        raise ValueError(f"{run_dir} is not waiting for human labels (round {state.round}, phase {state.phase}, oracle {run.cfg.al.oracle})")
    ids = read_parquet(run.run_dir.selected_file(state.round)).column("example_id").to_pylist()
    return run, state.round, ids


def cmd_label(args) -> int:
    from pipeline.oracles import export_copy, export_for_tool, export_to_label, import_labels

    run, k, ids = _labeling_round(args.run)
    run.run_dir.lock()  # export and import both write into the run: one process at a time
    try:
        if args.label_command == "export" and args.format != "jsonl":
            paths = export_for_tool(run.run_dir, k, ids, run.pool, run.task, args.format, args.out)
            print(f"{len(ids)} examples to label in {args.format} format: " + ", ".join(str(p) for p in paths))
            print(f"Label them, export the result from the tool, then: deft label import {args.run} FILE")
            return 0
        if args.label_command == "export":
            path = run.run_dir.to_label_file(k)
            if not path.is_file():  # an existing one may already hold a person's labels: it is never rewritten
                export_to_label(run.run_dir, k, ids, run.pool)
            if args.out:
                export_copy(path, args.out)
            print(f"{len(ids)} examples to label: {args.out or path}")
            return 0
        counts = import_labels(run.run_dir, k, args.file, ids, run.task, args.allow_partial)
    finally:
        run.run_dir.unlock()
    votes = f"; up to {counts['annotators']} annotators a row, {counts['split']} row(s) decided by majority" if counts["annotators"] > 1 else ""
    print(f"imported {counts['imported']} labels ({counts['format']}{votes}); {counts['labelled']} of {counts['expected']} labelled for round {k}.")
    if counts["labelled"] < counts["expected"] and not args.allow_partial:
        print("The round continues once every row is labelled, or import again with --allow-partial.")
    else:
        print(f"Continue with: deft resume {args.run}")
    return 0


def cmd_score(args) -> int:
    import pyarrow as pa

    from pipeline.io import write_parquet
    from pipeline.preflight import preflight
    from pipeline.scoring import PoolScorer
    from pipeline.strategies import measure_column
    from pipeline.tasks import get_task

    cfg = _config(args.config, args.overrides, args.address)
    task = get_task(cfg.task)
    measure = measure_column(task.kind, cfg.al.measure)
    checked = preflight(cfg, task, need_labels=False, test=False)  # also connects to Ray, checks the plan
    pool = checked.pool
    scorer = PoolScorer(cfg, checked.model_path)
    t0 = time.perf_counter()
    base = scorer.score(pool.scoring_input(), "base")
    lora = scorer.score(pool.scoring_input(), "lora")
    print(f"{len(pool)} rows scored (u_base + {cfg.scoring.mc_passes} MC passes) in {time.perf_counter() - t0:.1f}s")
    table = pa.table({"example_id": base.column("example_id"), "u_base": base.column(measure),
                      "u_lora": lora.column(measure), "prediction": base.column("prediction")})
    if args.out:
        write_parquet(args.out, table)
    top = table.sort_by([("u_base", "descending")]).slice(0, args.top)
    prompts = pool.rows(top.column("example_id"), ["prompt"]).column("prompt").to_pylist()
    print(f"most uncertain by u_base ({measure}):")
    for r, prompt in zip(top.to_pylist(), prompts):
        print(f"  {r['example_id']}  {r['u_base']:.4f}  {' '.join(prompt.split())[-90:]}")
    return 0


def cmd_bench(args) -> int:
    import importlib

    importlib.import_module(f"benchmarks.{args.name}").main(args.args)
    return 0


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import BAD_INPUT, describe

    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and its one `deft: error:` line (or --help)
        return int(e.code or 0)
    _console(args.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.verbose:  # results Ray holds for tasks a failure made moot are not news: the failure is
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("deft: interrupted", file=sys.stderr)
        _hint_resume(args)
        return 130
    except Exception as e:  # the one error surface: a line, the traceback only with -v
        message, code = describe(e)
        if args.verbose:
            traceback.print_exception(e)
        print(f"deft: error: {message}", file=sys.stderr)
        if code != BAD_INPUT:
            _hint_resume(args)
            if not args.verbose:
                print("deft: run again with -v for the traceback", file=sys.stderr)
        return code


def _console(verbose: bool) -> None:
    """The console: warnings and deft's own lines (progress bars, a line per round); -v: every log line and
    Ray workers' output. A run's full driver log goes to RUN/logs/driver.log either way."""
    from cluster.runtime import quiet_libraries

    os.environ["DEFT_VERBOSE"] = "1" if verbose else "0"
    root = logging.getLogger()
    if not any(getattr(h, "deft_console", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.deft_console = True
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    for h in root.handlers:
        if getattr(h, "deft_console", False):
            h.setLevel(logging.INFO if verbose else logging.WARNING)
    root.setLevel(logging.INFO)
    quiet_libraries()


def _dispatch(args) -> int:
    if args.command == "run":
        return cmd_run(args, args.config)
    if args.command == "quickstart":
        return cmd_compare(args, str(CONFIGS / "quickstart.yaml"), ["random", "star"], _ints(args.seeds, "seeds"), args.out)
    if args.command == "compare":
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        return cmd_compare(args, args.config, strategies, _ints(args.seeds, "seeds"), args.out)
    handler = {"resume": cmd_resume, "status": cmd_status, "report": cmd_report, "label": cmd_label,
               "score": cmd_score, "bench": cmd_bench}[args.command]
    return handler(args)


def _hint_resume(args) -> None:
    """After a run that stopped mid-way: where it is, and that nothing is lost."""
    from pipeline.run_dir import RunDir

    path = getattr(args, "run_dir_used", None) or (getattr(args, "run", None) if args.command == "resume" else None)
    if path and RunDir(path).exists():
        state = RunDir(path).read_state()
        print(f"deft: the run stopped in round {state.round}, phase {state.phase}; every finished phase is saved. "
              f"Continue with: deft resume {path}", file=sys.stderr)
    elif args.command in ("compare", "quickstart"):
        print(f"deft: finished runs are kept; the same command resumes the comparison in {args.out}", file=sys.stderr)

if __name__ == "__main__":
    sys.exit(main())
