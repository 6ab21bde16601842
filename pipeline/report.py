"""Reports: report.md (a table per round), learning_curve.png (accuracy against labels, one line per run)
and the area under the learning curve (AULC)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pipeline.io import write_text
from pipeline.run_dir import RunDir


def evaluated_points(run: RunDir) -> list[tuple[int, float, float]]:
    """(labels, accuracy, ECE) per evaluated round, starting with the base model at 0 labels when evaluated."""
    points = []
    base = run.path / "base_eval.json"
    if base.is_file():
        b = json.loads(base.read_text())
        points.append((0, b["accuracy"], b["ece"]))
    points += [(m["labels"], m["accuracy"], m["ece"]) for m in run.read_metrics() if m.get("accuracy") is not None]
    return points


def one_answer(result: dict) -> Optional[str]:
    """The answer an evaluation (a metrics line, base_eval.json) gave every test row, or None: several
    answers, or none counted (a generation task, or a round evaluated before deft counted them)."""
    answers = result.get("answers") or {}
    return next(iter(answers)) if len(answers) == 1 else None


def answers_cell(result: dict) -> str:
    """'true 70, false 30', most given first ('' where the answers were not counted). Sorted here: the
    JSON files sort the keys of what they hold."""
    answers = sorted((result.get("answers") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{a} {n}" for a, n in answers)


def curve_points(run: RunDir) -> list[tuple[int, float]]:
    """(labels, accuracy) per evaluated round, starting with the base model at 0 labels when evaluated."""
    return [(x, acc) for x, acc, _ in evaluated_points(run)]


def aulc(points: list[tuple[int, float]]) -> Optional[float]:
    """Trapezoidal area under accuracy-vs-labels, divided by the label range: a mean accuracy in [0, 1]."""
    if len(points) < 2:
        return points[0][1] if points else None
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


def _fmt(value, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def render_report(run: RunDir) -> str:
    cfg = run.read_config()
    metrics = run.read_metrics()
    state = run.read_state()
    lines = [
        f"# deft run: {run.path.name}",
        "",
        f"- task: `{cfg.task.name}`, pool: `{cfg.data.path}`, test: `{cfg.data.test_path}`",
        f"- model: `{cfg.model.name}`, LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} dropout={cfg.lora.dropout}, "
        f"B weight decay {cfg.train.weight_decay_b}",
        f"- strategy: `{cfg.al.strategy}` (measure `{cfg.al.measure}`), b0={cfg.al.initial_size} ({cfg.al.initial}), "
        f"b={cfg.al.batch_size}, T={cfg.scoring.mc_passes}, seed {cfg.seed}",
        f"- state: round {state.round}, phase `{state.phase}`",
        "",
        "| round | labels | accuracy | ECE | test answers | λ | selected (mean score) | new labels | train loss | score s "
        "| train s | eval s |",
        "|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    base = run.path / "base_eval.json"
    if base.is_file():
        b = json.loads(base.read_text())
        lines.append(f"| base | 0 | {_fmt(b['accuracy'])} | {_fmt(b['ece'])} | {answers_cell(b)} | | | | | | "
                     f"| {_fmt(b.get('eval_s'), '.1f')} |")
    for m in metrics:
        t, sel = m.get("timings", {}), m.get("selected", {})
        new = ", ".join(f"{k}: {v}" for k, v in sel.get("labels", {}).items())
        lines.append(
            f"| {m['round']} | {m['labels']} | {_fmt(m.get('accuracy'))} | {_fmt(m.get('ece'))} | {answers_cell(m)} "
            f"| {_fmt(m.get('lambda'), '.2f')} "
            f"| {sel.get('n', '')} ({_fmt(sel.get('mean_score'))}) | {new} | {_fmt(m.get('train_loss'))} "
            f"| {_fmt(t.get('scoring_s'), '.1f')} | {_fmt(t.get('training_s'), '.1f')} | {_fmt(m.get('eval_s'), '.1f')} |"
        )
    area = aulc(curve_points(run))
    lines += ["", f"Area under the learning curve (accuracy vs labels, normalised by the label range): **{_fmt(area)}**", ""]
    return "\n".join(lines)


def plot_learning_curves(runs: list[RunDir], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for run in runs:
        points = curve_points(run)
        if not points:
            continue
        cfg = run.read_config()
        x, y = zip(*points)
        ax.plot(x, y, marker="o", label=f"{cfg.al.strategy} ({run.path.name}), AULC {_fmt(aulc(points))}")
    ax.set_xlabel("labelled examples")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def save_figure(fig, out: Path) -> Path:
    """Write a matplotlib figure atomically (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out


def write_report(run: RunDir, others: Optional[list[RunDir]] = None) -> tuple[Path, Path, Optional[float]]:
    """Write report.md and learning_curve.png into `run` (the curve also shows `others`); return AULC."""
    write_text(run.report_file, render_report(run))
    plot_learning_curves([run] + list(others or []), run.curve_file)
    return run.report_file, run.curve_file, aulc(curve_points(run))
