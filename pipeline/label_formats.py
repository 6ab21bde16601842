"""Label files in the formats annotation teams use: deft's JSONL, Label Studio's JSON, Argilla's records.

Export writes one round's selected rows with what the annotator needs beside the prompt: the newest
model's own answer (a pre-annotation to accept or correct), its confidence, and the acquisition score
(the reason the row was picked; sort by it). Import recognises the format by content, collects every
annotator's answer per row, and takes the majority; a tie is an error that names the task.

Formats, as the tools document them:
- Label Studio (https://labelstud.io/guide/task_format): a JSON list of tasks, each with `data`,
  `predictions` ({model_version, score, result}) and, in an export, `annotations` whose `result` holds
  a `choices` (or `textarea`) value; a skipped task is an annotation with `was_cancelled: true`. The
  labelling config (`<View>` XML) is written beside the tasks.
- Argilla 2.x: records as `Record.to_dict()` writes them (`records.json` of `Dataset.to_disk`, or
  `records.to_json`), or flattened as `records.to_list(flatten=True)` / `to_datasets()` write them
  (`label.responses`, `label.responses.status`, ...), in a JSON list or JSON lines. Only `submitted`
  responses count. Argilla's nested form carries no per-response status, so there a record's responses
  count unless the record itself is still `pending`.
Neither tool is a dependency: these are plain JSON files.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from xml.sax.saxutils import quoteattr

from pipeline.tasks import BadRow, Task, VerbalizerTask

FORMATS = ("jsonl", "label-studio", "argilla")
QUESTION = "label"  # the question's name in both tools' configs; import looks for it
FIELD = "prompt"  # the text field shown to annotators


class LabelImportError(ValueError):
    """A label file that cannot be taken as it is; nothing was imported."""


def agent(round: int) -> str:
    return f"deft round {round}"


# ---- export ------------------------------------------------------------------------------------------
@dataclass
class ExportRow:
    example_id: str
    prompt: str
    score: Optional[float]  # the acquisition score that selected the row
    prediction: Optional[str] = None  # the newest model's answer; None where the round scored nothing
    confidence: Optional[float] = None


def label_studio_tasks(rows: list[ExportRow], task: Task, round: int) -> list[dict]:
    """Tasks to import into Label Studio, with the model's answer as a prediction Label Studio shows as
    a pre-annotation; `score` (the acquisition score) sorts the Data Manager."""
    out = []
    for r in rows:
        item: dict[str, Any] = {"data": {FIELD: r.prompt, "example_id": r.example_id, "deft_round": round}}
        if r.prediction is not None:
            item["predictions"] = [{
                "model_version": agent(round), "score": r.score,
                "result": [_ls_result(task, r.prediction)],
            }]
        out.append(item)
    return out


def _ls_result(task: Task, value: str) -> dict:
    if isinstance(task, VerbalizerTask):
        return {"from_name": QUESTION, "to_name": FIELD, "type": "choices", "value": {"choices": [value]}}
    return {"from_name": QUESTION, "to_name": FIELD, "type": "textarea", "value": {"text": [value]}}


def label_studio_config(task: Task) -> str:
    """The project's labelling interface: the prompt, and one choice per label (or a text box)."""
    if isinstance(task, VerbalizerTask):
        choices = "\n".join(f"    <Choice value={quoteattr(label)}/>" for label in task.labels)
        answer = f'  <Choices name="{QUESTION}" toName="{FIELD}" choice="single" showInLine="true">\n{choices}\n  </Choices>'
    else:
        answer = f'  <TextArea name="{QUESTION}" toName="{FIELD}" maxSubmissions="1" editable="true"/>'
    return f'<View>\n  <Text name="{FIELD}" value="${FIELD}"/>\n{answer}\n</View>\n'


def argilla_records(rows: list[ExportRow], round: int) -> list[dict]:
    """Records as Argilla's `Record.to_dict()` writes them, so `rg.Record.from_dict` reads each one back.

    The suggestion's score is the model's confidence in its answer (Argilla shows it beside the
    suggestion, on a 0-1 scale); the acquisition score goes in the metadata, where the UI sorts by it.
    """
    out = []
    for r in rows:
        suggestions = {} if r.prediction is None else {
            QUESTION: {"value": r.prediction, "score": r.confidence, "agent": agent(round)}}
        out.append({
            "id": r.example_id, "fields": {FIELD: r.prompt},
            "metadata": {"example_id": r.example_id, "deft_round": round, "acquisition_score": r.score},
            "suggestions": suggestions, "responses": {}, "vectors": {}, "status": "pending",
        })
    return out


# ---- import ------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One row's answers, as found in a file."""
    where: str  # how to find it: "FILE:LINE" or "FILE: task 17"
    example_id: Optional[str]
    votes: list[str] = field(default_factory=list)
    round: Optional[int] = None  # the round the file was exported for, when it says


def detect(path: Path) -> tuple[str, Any]:
    """(format, parsed content) of a label file or an Argilla `to_disk` folder."""
    if path.is_dir():
        records = path / "records.json"
        if not records.is_file():
            raise LabelImportError(f"{path} is a directory without records.json (an Argilla Dataset.to_disk folder has one)")
        path = records
    if not path.is_file():
        raise LabelImportError(f"label file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise LabelImportError(f"{path}:{line}: not UTF-8 text ({e.reason}); re-save the file as UTF-8") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise LabelImportError(f"{path}:{e.lineno}: undecodable JSON: {e.msg}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise LabelImportError(f"{path}: a JSON list of objects was expected")
        return (_kind(path, rows[0]) if rows else "jsonl"), (path, rows)
    return "jsonl-rows", (path, text)  # JSON lines: decided once the first line is parsed


def _kind(path: Path, first: dict) -> str:
    if "annotation_id" in first or "annotator" in first:
        raise LabelImportError(f"{path} looks like Label Studio's JSON-MIN export, which drops skipped tasks and "
                             "merges annotators; export the project as JSON instead")
    if "annotations" in first or ("data" in first and "example_id" in (first.get("data") or {})):
        return "label-studio"
    if _is_argilla(first):
        return "argilla"
    if "example_id" in first:
        return "jsonl"
    raise LabelImportError(f"{path}: not a deft, Label Studio or Argilla label file (first record has keys "
                         f"{sorted(first)[:8]})")


def _is_argilla(row: dict) -> bool:
    return "fields" in row or "responses" in row or any(k.startswith(f"{QUESTION}.") for k in row) or "_server_id" in row


def read_items(path: str | Path) -> tuple[str, list[Item], list[str]]:
    """(format, items, problems) for any supported file; problems are collected, not raised."""
    kind, (path, content) = detect(Path(path))
    if kind == "label-studio":
        return kind, *_label_studio_items(path, content)
    if kind == "argilla":
        return kind, *_argilla_items(path, enumerate(content, start=1), per_line=False)
    if kind == "jsonl":
        return kind, *_deft_items(path, enumerate(content, start=1), per_line=False)
    rows, problems = [], []
    for line_no, raw in enumerate(content.splitlines(), start=1):
        if raw.strip():
            try:
                rows.append((line_no, json.loads(raw)))
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{line_no}: undecodable JSON: {e.msg}")
    if not rows:
        return "jsonl", [], problems  # an empty file: nothing labelled (the caller says so)
    bad = [f"{path}:{n}: a JSON object was expected" for n, r in rows if not isinstance(r, dict)]
    if bad:
        return "jsonl", [], problems + bad
    if _is_argilla(rows[0][1]):
        items, more = _argilla_items(path, rows, per_line=True)
        return "argilla", items, problems + more
    items, more = _deft_items(path, rows, per_line=True)
    return "jsonl", items, problems + more


def _where(path: Path, n: int, per_line: bool, name: str = "row") -> str:
    return f"{path}:{n}" if per_line else f"{path}: {name} {n}"


def _deft_items(path: Path, rows, per_line: bool) -> tuple[list[Item], list[str]]:
    items, problems = [], []
    for n, row in rows:
        where = _where(path, n, per_line)
        if "example_id" not in row:
            problems.append(f"{where}: missing field 'example_id'")
            continue
        label = row.get("label")
        blank = label is None or (isinstance(label, str) and not label.strip())
        items.append(Item(where, row["example_id"], [] if blank else [str(label)]))
    return items, problems


def _label_studio_items(path: Path, tasks: list[dict]) -> tuple[list[Item], list[str]]:
    items, problems = [], []
    for n, t in enumerate(tasks, start=1):
        data = t.get("data") if isinstance(t.get("data"), dict) else {}
        where = f"{path}: task {t.get('id', f'#{n}')}"
        if "example_id" not in data:
            problems.append(f"{where}: data has no 'example_id' (was the task exported by `deft label export`?)")
            continue
        votes = []
        for a in t.get("annotations") or []:
            if a.get("was_cancelled"):
                continue  # skipped by the annotator: no answer
            values = [v for r in a.get("result") or [] for v in _ls_values(r)]
            if len(values) > 1:
                problems.append(f"{where}: annotation {a.get('id')} holds {len(values)} answers; one was expected")
            elif values:
                votes.append(values[0])
        items.append(Item(where, data["example_id"], votes, _as_round(data.get("deft_round"))))
    return items, problems


def _ls_values(result: dict) -> list[str]:
    if result.get("from_name") not in (QUESTION, None):
        return []
    value = result.get("value") or {}
    return [str(v) for v in (value.get("choices") or value.get("text") or [])]


def _argilla_items(path: Path, rows, per_line: bool) -> tuple[list[Item], list[str]]:
    items, problems = [], []
    for n, row in rows:
        where = _where(path, n, per_line, "record")
        meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else row
        example_id = meta.get("example_id") or row.get("id")
        if example_id is None:
            problems.append(f"{where}: the record has no id")
            continue
        items.append(Item(f"{where} (id {example_id})", str(example_id), _argilla_votes(row), _as_round(meta.get("deft_round"))))
    return items, problems


def _argilla_votes(row: dict) -> list[str]:
    if f"{QUESTION}.responses" in row:  # flattened: parallel lists of values and statuses
        values = row.get(f"{QUESTION}.responses") or []
        statuses = row.get(f"{QUESTION}.responses.status") or [None] * len(values)
        return [str(v) for v, s in zip(values, statuses) if v is not None and s in ("submitted", None)]
    responses = (row.get("responses") or {}).get(QUESTION) or []
    if any("status" in r for r in responses):
        return [str(r["value"]) for r in responses if r.get("status") == "submitted" and r.get("value") is not None]
    if row.get("status") == "pending":  # nested form: no per-response status, so a pending record waits
        return []
    return [str(r["value"]) for r in responses if r.get("value") is not None]


def _as_round(value) -> Optional[int]:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


@dataclass
class Decision:
    label: str
    annotators: int  # how many answers the row had
    agreement: float  # the winning label's share of them


def normalise_label(task: Task, raw: str) -> str:
    if isinstance(task, VerbalizerTask):
        return task.parse_label(raw)
    return raw.strip()  # generation: the answer text itself (trained on as written)


def decide(items: list[Item], expected: list[str], round: int, task: Task, path) -> tuple[dict[str, Decision], list[str]]:
    """Majority vote per row, with every problem collected: unknown ids, duplicates, labels outside the
    set, ties, and a file exported for another round."""
    wanted, seen, decisions, problems = set(expected), {}, {}, []
    rounds = {i.round for i in items if i.round is not None}
    if rounds and rounds != {round}:
        return {}, [f"{path} was exported for round {sorted(rounds)[0]}; this run is waiting for round {round}'s labels "
                    f"(`deft label export` writes the current file)"]
    for item in items:
        if item.example_id not in wanted:
            problems.append(f"{item.where}: unknown example_id {item.example_id!r}: not selected for labelling this round")
            continue
        if item.example_id in seen:
            problems.append(f"{item.where}: duplicate example_id {item.example_id!r} (first at {seen[item.example_id]})")
            continue
        seen[item.example_id] = item.where
        votes = []
        for v in item.votes:
            try:
                votes.append(normalise_label(task, v))
            except BadRow as e:
                problems.append(f"{item.where}: {str(e).split(': ', 1)[1]}")
        if len(votes) != len(item.votes) or not votes:
            continue
        ranked = Counter(votes).most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            tied = [label for label, c in ranked if c == ranked[0][1]]
            problems.append(f"{item.where}: a tie between {', '.join(repr(t) for t in tied)} ({ranked[0][1]} vote(s) each) "
                            f"for example_id {item.example_id!r}; resolve it in the tool and export again")
            continue
        decisions[item.example_id] = Decision(ranked[0][0], len(votes), ranked[0][1] / len(votes))
    return decisions, problems
