"""Pools: rows from JSONL, Parquet, CSV, a HF `datasets` id or the generated demo, each with a stable example_id.

A pool table has the columns
  example_id  stable id: the row's `id_field`, else a hash of its content (never its position)
  prompt      what the model sees
  label       the gold label (hidden from scorers; only the oracle reads it)
  target      the text trained after the prompt

Bad rows are reported with file and line. The load fails with that report, or, with on_bad_row="skip",
drops and counts them. It never fails silently.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.tasks import BadRow, Task

POOL_SCHEMA = pa.schema(
    [("example_id", pa.string()), ("prompt", pa.string()), ("label", pa.string()), ("target", pa.string())]
)
SCORER_COLUMNS = ["example_id", "prompt"]  # all a scorer may see: no label, no target
_SHOWN_ERRORS = 20


class DataError(ValueError):
    """The data could not be loaded; the message lists the bad rows by file and line."""


@dataclass(frozen=True)
class BadRowRecord:
    source: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: field '{self.field}': {self.message}"


@dataclass
class Pool:
    table: pa.Table
    source: str
    skipped: list[BadRowRecord] = field(default_factory=list)

    @property
    def example_ids(self) -> list[str]:
        return self.table.column("example_id").to_pylist()

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, example_ids, columns: list[str]) -> pa.Table:
        """The pool's `columns` for `example_ids` (a list or an Arrow array), in that order: a vectorised
        lookup, no per-row dict over the pool. An id the pool lacks is a KeyError that names it."""
        ids = example_ids if isinstance(example_ids, (pa.Array, pa.ChunkedArray)) else pa.array(example_ids, pa.string())
        at = pc.index_in(ids, value_set=self.table.column("example_id"))
        if at.null_count:
            missing = pc.filter(ids, pc.is_null(at)).to_pylist()
            raise KeyError(f"{len(missing)} example id(s) are not in the pool {self.source} (e.g. {missing[:3]})")
        return self.table.select(columns).take(at)

    def for_scoring(self) -> pa.Table:
        """The only view of the pool a scorer gets: ids and prompts, never labels."""
        return self.table.select(SCORER_COLUMNS)


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict | BadRow]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield line_no, BadRow("<json>", f"undecodable JSON: {e}")
                continue
            yield line_no, row if isinstance(row, dict) else BadRow("<json>", f"expected an object, got {type(row).__name__}")


def _read_table(table: pa.Table, first_line: int) -> Iterator[tuple[int, dict]]:
    for i, row in enumerate(table.to_pylist()):
        yield i + first_line, row


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict | BadRow]]:
    # stdlib csv rather than pyarrow.csv: it keeps every value as text (a label "1" stays "1") and
    # reports the real file line of each record, even when a quoted field spans lines.
    import csv

    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        start = 2
        try:
            for row in reader:
                if None in row:
                    yield start, BadRow("<csv>", f"{len(row[None])} more value(s) than header columns")
                else:
                    yield start, row
                start = reader.line_num + 1
        except UnicodeDecodeError as e:  # the reader decodes ahead of its records: the line is approximate
            raise DataError(f"{path}: not UTF-8 text near line {max(start, reader.line_num + 1)}: {e.reason} "
                            f"(byte 0x{e.object[e.start]:02x}); re-save the file as UTF-8") from None
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: unreadable CSV: {e}") from None


def _read_hf(spec: str) -> Iterator[tuple[int, dict]]:
    parts = spec[len("hf:"):].split(":")
    if len(parts) not in (2, 3):
        raise DataError(f"{spec}: expected hf:<dataset id>[:<config>]:<split>")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline misses, unknown ids/splits and hub errors all come as different types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (deft is offline: set data.allow_download: true to fetch it)" if offline else ""
        raise DataError(f"{spec}: cannot load the dataset: {first}{hint}") from None
    for i, row in enumerate(ds):
        yield i + 1, row


def read_rows(source: str, demo_size: int = 400, seed: int = 0, split: str = "pool") -> Iterator[tuple[int, dict | BadRow]]:
    """(line, row) pairs; line is the file line for JSONL/CSV and the 1-based row number otherwise.
    `split` only matters for the generated demo, whose pool and test split share no question."""
    if source == "demo":
        from pipeline.demo import demo_rows

        yield from enumerate(demo_rows(demo_size, seed, split), start=1)
        return
    if source.startswith("hf:"):
        yield from _read_hf(source)
        return
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".jsonl", ".json", ".ndjson"):
        yield from _read_jsonl(path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        yield from _read_table(table, first_line=1)
    elif suffix in (".csv", ".tsv"):
        yield from _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(f"{path}: unknown format '{suffix}'; expected .jsonl, .parquet, .csv or .tsv")


def content_id(row: dict, fields: tuple[str, ...]) -> str:
    """A stable id from the row's input fields: the same input gets the same id in every run and every order.

    Only the input fields, never the answer: scorers see ids and ids seed dropout masks, so an id that
    hashed the gold answer would make u_lora a function of the label."""
    blob = json.dumps({f: row.get(f) for f in fields}, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def _row_id(row: dict, id_field: Optional[str], fields: tuple[str, ...]) -> str:
    if id_field is None:
        return content_id(row, fields)
    value = row.get(id_field)
    if value is None or str(value).strip() == "":
        raise BadRow(id_field, "missing id")
    return str(value)


def load_pool(
    source: str,
    task: Task,
    *,
    id_field: Optional[str] = None,
    on_bad_row: str = "error",
    limit: Optional[int] = None,
    require_label: bool = True,
    demo_size: int = 400,
    seed: int = 0,
    split: str = "pool",
) -> Pool:
    """Load and validate a pool. Raises DataError listing every bad row unless on_bad_row == 'skip'."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row should be 'error' or 'skip', got {on_bad_row!r}")
    rows, bad, first_line = [], [], {}
    for line, row in read_rows(source, demo_size, seed, split):
        try:
            if isinstance(row, BadRow):
                raise row
            example_id = _row_id(row, id_field, task.input_fields)
            if example_id in first_line:
                raise BadRow(id_field or "<row>", f"duplicate example_id {example_id!r} (first seen at line {first_line[example_id]})")
            ex = task.example(row, require_label=require_label)
        except BadRow as e:
            bad.append(BadRowRecord(source, line, e.field, str(e).split(": ", 1)[1]))
            continue
        first_line[example_id] = line
        rows.append({"example_id": example_id, **ex})
        if limit is not None and len(rows) >= limit:
            break
    if bad and on_bad_row == "error":
        shown = "\n  ".join(str(b) for b in bad[:_SHOWN_ERRORS])
        more = f"\n  ... and {len(bad) - _SHOWN_ERRORS} more" if len(bad) > _SHOWN_ERRORS else ""
        raise DataError(
            f"{len(bad)} bad row(s) in {source}:\n  {shown}{more}\n"
            "Fix them, or set data.on_bad_row=skip to drop and count them."
        )
    if not rows:
        raise DataError(f"{source}: no usable rows")
    return Pool(pa.Table.from_pylist(rows, schema=POOL_SCHEMA), source, bad)


def pool_from_config(data, task: Task, seed: int, require_label: bool) -> Pool:
    """The pool a DataConfig names: data.path, cut to data.limit rows."""
    return load_pool(data.path, task, id_field=data.id_field, on_bad_row=data.on_bad_row, limit=data.limit,
                     require_label=require_label, demo_size=data.demo_size, seed=seed)


def eval_split_from_config(data, task: Task, seed: int, eval_limit: Optional[int]) -> Optional[Pool]:
    """The evaluation split (data.test_path), cut to al.eval_limit rows only: data.limit is for the pool."""
    if not data.test_path:
        return None
    return load_pool(data.test_path, task, id_field=data.id_field, on_bad_row=data.on_bad_row, limit=eval_limit,
                     require_label=True, demo_size=data.demo_size, seed=seed, split="test")
