"""Oracles: where labels come from. Labels never reach a scorer.

simulated  reveals the pool's hidden label column, and only for the ids selected this round.
human      writes rounds/k/to_label.jsonl (example_id, prompt, empty label) and stops the run; a person
           fills it in, or labels the round in Label Studio or Argilla (`deft label export --format`,
           pipeline/label_formats.py), and `deft label import RUN FILE` validates it. A bad file changes
           nothing and the error names its line or task.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import Pool
from pipeline.io import read_parquet, rows_with_ids, write_parquet, write_text
from pipeline.label_formats import (FORMATS, Decision, ExportRow, LabelImportError, argilla_records, decide,
                                    label_studio_config, label_studio_tasks, read_items)
from pipeline.run_dir import LABELED_SCHEMA, RunDir
from pipeline.tasks import Task

IMPORTED_SCHEMA = pa.schema([("example_id", pa.string()), ("label", pa.string()), ("annotators", pa.int64()),
                             ("agreement", pa.float64())])


class SimulatedOracle:
    """Reveals the pool's hidden label column, and only for the ids asked about (read from disk then)."""

    def __init__(self, pool: Pool):
        self._pool = pool

    def label(self, example_ids: list[str], round: int) -> pa.Table:
        try:
            labels = self._pool.rows(example_ids, ["label"]).column("label").to_pylist()
        except KeyError as e:
            raise ValueError(f"the simulated oracle cannot label ids outside the pool: {e.args[0]}") from None
        missing = [e for e, label in zip(example_ids, labels) if label is None]
        if missing:
            raise ValueError(f"the simulated oracle has no label for {len(missing)} selected ids (e.g. {missing[:3]})")
        return pa.Table.from_pylist(
            [{"example_id": e, "label": label, "round_added": round, "source": "oracle"} for e, label in zip(example_ids, labels)],
            schema=LABELED_SCHEMA,
        )


def export_to_label(run: RunDir, round: int, example_ids: list[str], pool: Pool) -> Path:
    """Write the file a person fills in: one JSON object per line with an empty "label"."""
    prompts = pool.rows(example_ids, ["prompt"]).column("prompt").to_pylist()
    lines = [json.dumps({"example_id": e, "prompt": p, "label": ""}, ensure_ascii=False) for e, p in zip(example_ids, prompts)]
    path = run.to_label_file(round)
    write_text(path, "\n".join(lines) + "\n")
    return path


def filled_labels(path: str | Path) -> Optional[int]:
    """How many rows of a deft label file have a label filled in; None if it is not one (or not readable)."""
    try:
        kind, items, problems = read_items(path)
    except (OSError, LabelImportError):
        return None
    return None if kind != "jsonl" or problems else sum(bool(i.votes) for i in items)


def export_copy(source: Path, out: str | Path) -> None:
    """Copy the file to label to `out`, never over a file that holds labels (or anything but a blank one)."""
    out = Path(out)
    if out.exists() and out.resolve() == source.resolve():
        return
    if out.exists():
        filled = filled_labels(out)
        if filled is None:
            raise LabelImportError(f"{out} exists and is not an empty deft label file; deft will not replace it. "
                                   "Choose another --out")
        if filled:
            raise LabelImportError(f"{out} holds {filled} filled label(s); deft never overwrites labels. Import it "
                                   "with `deft label import`, or choose another --out")
    write_text(out, source.read_text(encoding="utf-8"))


def export_rows(run: RunDir, round: int, example_ids: list[str], pool: Pool) -> list[ExportRow]:
    """The round's selected rows with their acquisition score and, where the round scored the pool, the
    newest model's answer and confidence (scores.parquet; older runs lack them)."""
    prompts = pool.rows(example_ids, ["prompt"]).column("prompt").to_pylist()
    selected = read_parquet(run.selected_file(round)).to_pylist()
    score = {r["example_id"]: r["score"] for r in selected}
    path = run.scores_file(round)
    model = {}
    if path.is_file() and "prediction" in pq.read_schema(path).names:  # only the exported rows are kept
        mine = rows_with_ids(path, pa.array(example_ids, pa.string()), ["example_id", "prediction", "confidence"])
        model = {r["example_id"]: r for r in mine.to_pylist()}
    return [ExportRow(e, p, score.get(e), model.get(e, {}).get("prediction"), model.get(e, {}).get("confidence"))
            for e, p in zip(example_ids, prompts)]


def export_for_tool(run: RunDir, round: int, example_ids: list[str], pool: Pool, task: Task, fmt: str,
                    out: Optional[str | Path] = None) -> list[Path]:
    """Write the round's rows for Label Studio (tasks + labelling config) or Argilla (records); returns the
    paths. These files hold no labels and are the same each time, so an existing one is only replaced by
    identical content: a file that differs is refused."""
    rows = export_rows(run, round, example_ids, pool)
    if fmt == "label-studio":
        tasks = Path(out) if out else run.round_dir(round) / "to_label.label-studio.json"
        files = {tasks: json.dumps(label_studio_tasks(rows, task, round), indent=1, ensure_ascii=False) + "\n",
                 tasks.with_name(tasks.stem + ".label_config.xml"): label_studio_config(task)}
    elif fmt == "argilla":
        records = Path(out) if out else run.round_dir(round) / "to_label.argilla.json"
        files = {records: json.dumps(argilla_records(rows, round), indent=1, ensure_ascii=False) + "\n"}
    else:
        raise LabelImportError(f"--format should be one of {list(FORMATS)}, got {fmt!r}")
    for path, text in files.items():
        if path.exists() and (not path.is_file() or path.read_text(encoding="utf-8", errors="replace") != text):
            raise LabelImportError(f"{path} exists and differs from this export; deft will not replace it. Choose another --out")
    for path, text in files.items():
        write_text(path, text)
    return list(files)


def parse_label_file(path: str | Path, expected: list[str], round: int, task: Task) -> tuple[str, dict[str, Decision]]:
    """(format, {example_id: decision}) for the answered rows of a deft, Label Studio or Argilla file.
    Every problem is collected, each with its line or task; any problem raises LabelImportError and
    nothing is imported."""
    kind, items, problems = read_items(path)
    decisions, more = decide(items, expected, round, task, path)
    errors = problems + more
    if errors:
        raise LabelImportError(f"{len(errors)} problem(s) in {path}; nothing was imported:\n  " + "\n  ".join(errors[:20]))
    return kind, decisions


def import_labels(run: RunDir, round: int, path: str | Path, expected: list[str], task: Task, allow_partial: bool) -> dict:
    """Validate `path` and merge its labels into rounds/k/imported.parquet (earlier partial imports stay;
    a row answered again takes the newer answer). Each row records how many annotators answered it and
    the winning label's share of their answers."""
    kind, decisions = parse_label_file(path, expected, round, task)
    if not decisions:
        raise LabelImportError(f"{path}: no row has a label; nothing was imported")
    current = read_parquet(run.imported_file(round)).to_pylist() if run.imported_file(round).is_file() else []
    merged = {r["example_id"]: r for r in current}
    merged.update({e: {"example_id": e, "label": d.label, "annotators": d.annotators, "agreement": d.agreement}
                   for e, d in decisions.items()})
    rows = [{"annotators": 1, "agreement": 1.0, **merged[e]} for e in expected if e in merged]
    write_parquet(run.imported_file(round), pa.Table.from_pylist(rows, schema=IMPORTED_SCHEMA))
    if allow_partial:
        write_text(run.round_dir(round) / "allow_partial", "")
    votes = [d.annotators for d in decisions.values()]
    return {"format": kind, "imported": len(decisions), "labelled": len(merged), "expected": len(expected),
            "annotators": max(votes), "split": sum(d.agreement < 1 for d in decisions.values())}


def imported_labels(run: RunDir, round: int) -> tuple[dict[str, str], bool]:
    """(labels imported so far for this round, whether a partial round was allowed)."""
    f = run.imported_file(round)
    labels = {r["example_id"]: r["label"] for r in read_parquet(f).to_pylist()} if f.is_file() else {}
    return labels, (run.round_dir(round) / "allow_partial").is_file()
