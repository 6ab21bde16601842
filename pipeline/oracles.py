"""Oracles: where labels come from. Labels never reach a scorer.

simulated  reveals the pool's hidden label column, and only for the ids selected this round.
human      writes rounds/k/to_label.jsonl (example_id, prompt, empty label) and stops the run; a person
           fills it in and `deft label import RUN FILE` validates it. A bad file changes nothing and the
           error names its line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pyarrow as pa

from pipeline.data import Pool
from pipeline.io import read_parquet, write_parquet, write_text
from pipeline.run_dir import LABELED_SCHEMA, RunDir
from pipeline.tasks import BadRow, Task, VerbalizerTask

IMPORTED_SCHEMA = pa.schema([("example_id", pa.string()), ("label", pa.string())])


class LabelImportError(ValueError):
    pass


class SimulatedOracle:
    def __init__(self, pool: Pool):
        self._labels = dict(zip(pool.example_ids, pool.table.column("label").to_pylist()))

    def label(self, example_ids: list[str], round: int) -> pa.Table:
        missing = [e for e in example_ids if self._labels.get(e) is None]
        if missing:
            raise ValueError(f"the simulated oracle has no label for {len(missing)} selected ids (e.g. {missing[:3]})")
        return pa.Table.from_pylist(
            [{"example_id": e, "label": self._labels[e], "round_added": round, "source": "oracle"} for e in example_ids],
            schema=LABELED_SCHEMA,
        )


def export_to_label(run: RunDir, round: int, example_ids: list[str], pool: Pool) -> Path:
    """Write the file a person fills in: one JSON object per line with an empty "label"."""
    prompts = dict(zip(pool.example_ids, pool.table.column("prompt").to_pylist()))
    lines = [json.dumps({"example_id": e, "prompt": prompts[e], "label": ""}, ensure_ascii=False) for e in example_ids]
    path = run.to_label_file(round)
    write_text(path, "\n".join(lines) + "\n")
    return path


def filled_labels(path: str | Path) -> Optional[int]:
    """How many rows of a label file have a label filled in; None if it is not a deft label file at all."""
    count = 0
    try:
        for raw in Path(path).read_text(encoding="utf-8").splitlines():
            if raw.strip():
                row = json.loads(raw)
                label = row.get("label") if isinstance(row, dict) else None
                if not isinstance(row, dict) or "example_id" not in row:
                    return None
                count += label is not None and str(label).strip() != ""
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return count


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


def _normalise_label(task: Task, raw: str) -> str:
    if isinstance(task, VerbalizerTask):
        return task.parse_label(raw)
    return raw.strip()  # generation: the answer text itself (trained on as written)


def parse_label_file(path: str | Path, expected: list[str], task: Task) -> dict[str, str]:
    """{example_id: label} for the filled rows of `path`. Every problem is collected, each with its line;
    any problem raises LabelImportError and nothing is imported."""
    path = Path(path)
    if not path.is_file():
        raise LabelImportError(f"label file not found: {path}")
    wanted, labels, first, errors = set(expected), {}, {}, []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise LabelImportError(f"{path}:{line}: not UTF-8 text ({e.reason}); re-save the file as UTF-8") from None
    for line_no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            errors.append(f"{path}:{line_no}: undecodable JSON: {e}")
            continue
        eid = row.get("example_id") if isinstance(row, dict) else None
        if eid is None:
            errors.append(f"{path}:{line_no}: missing field 'example_id'")
        elif eid not in wanted:
            errors.append(f"{path}:{line_no}: unknown example_id {eid!r}: not selected for labelling this round")
        elif eid in first:
            errors.append(f"{path}:{line_no}: duplicate example_id {eid!r} (first at line {first[eid]})")
        else:
            first[eid] = line_no
            label = row.get("label")
            if label is None or (isinstance(label, str) and not label.strip()):
                continue  # left blank: not labelled yet
            try:
                labels[eid] = _normalise_label(task, str(label))
            except BadRow as e:
                errors.append(f"{path}:{line_no}: {str(e).split(': ', 1)[1]}")
    if errors:
        raise LabelImportError(f"{len(errors)} problem(s) in {path}; nothing was imported:\n  " + "\n  ".join(errors[:20]))
    return labels


def import_labels(run: RunDir, round: int, path: str | Path, expected: list[str], task: Task, allow_partial: bool) -> dict:
    """Validate `path` and merge its labels into rounds/k/imported.parquet (earlier partial imports stay)."""
    labels = parse_label_file(path, expected, task)
    if not labels:
        raise LabelImportError(f"{path}: no row has a label; nothing was imported")
    current = read_parquet(run.imported_file(round)).to_pylist() if run.imported_file(round).is_file() else []
    merged = {r["example_id"]: r["label"] for r in current}
    merged.update(labels)
    write_parquet(run.imported_file(round), pa.Table.from_pylist(
        [{"example_id": e, "label": merged[e]} for e in expected if e in merged], schema=IMPORTED_SCHEMA))
    if allow_partial:
        write_text(run.round_dir(round) / "allow_partial", "")
    return {"imported": len(labels), "labelled": len(merged), "expected": len(expected)}


def imported_labels(run: RunDir, round: int) -> tuple[dict[str, str], bool]:
    """(labels imported so far for this round, whether a partial round was allowed)."""
    f = run.imported_file(round)
    labels = {r["example_id"]: r["label"] for r in read_parquet(f).to_pylist()} if f.is_file() else {}
    return labels, (run.round_dir(round) / "allow_partial").is_file()
