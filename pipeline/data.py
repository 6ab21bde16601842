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

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io import iter_batches, release_arrow_memory
from pipeline.tasks import BadRow, Task

POOL_SCHEMA = pa.schema(
    [("example_id", pa.string()), ("prompt", pa.string()), ("label", pa.string()), ("target", pa.string())]
)
SCORER_COLUMNS = ["example_id", "prompt"]  # all a scorer may see: no label, no target
ROW_GROUP_ROWS = 4096  # rows per Parquet row group of a pool's files: the unit a scorer reads
INPUTS_SCHEMA = pa.schema([("example_id", pa.string()), ("prompt", pa.string()), ("n_chars", pa.int32())])
LABELS_SCHEMA = pa.schema([("example_id", pa.string()), ("label", pa.string()), ("target", pa.string())])
POOL_FORMAT = 1  # bump when the files load_pool writes change, so old cached pools are not reused
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


class Pool:
    """A validated pool, kept on disk in its own directory (see `load_pool`), as two Parquet files with
    row groups of `row_group_rows` rows, in source order:

      inputs.parquet  example_id, prompt, n_chars   all a scorer may read (scorers open this file only)
      labels.parquet  example_id, label, target     for the oracle and the trainer

    The driver holds only the example_id column and the prompt lengths (about 30 bytes a row). Prompts,
    labels and targets are read for the rows that need them (`rows`), and scorers read their rows of
    inputs.parquet themselves (`scoring_input`), so a large pool never passes through the driver.
    """

    def __init__(self, directory: str | Path, source: str, skipped: Optional[list[BadRowRecord]] = None):
        self.dir, self.source = Path(directory), source
        self.skipped = list(skipped or [])
        meta = json.loads((self.dir / "meta.json").read_text())
        self.row_group_rows = int(meta["row_group_rows"])
        for path in (self.inputs_path, self.labels_path):  # rows are found by position // row_group_rows
            sizes = [g.num_rows for g in _row_groups(path)]
            if any(n != self.row_group_rows for n in sizes[:-1]):
                raise DataError(f"{path}: row groups of {sorted(set(sizes))} rows, expected {self.row_group_rows}; "
                                f"delete {self.dir} to rebuild it")
        self.ids, self.n_chars = _read_index(self.inputs_path)
        release_arrow_memory()

    @property
    def inputs_path(self) -> Path:
        return self.dir / "inputs.parquet"

    @property
    def labels_path(self) -> Path:
        return self.dir / "labels.parquet"

    @property
    def example_ids(self) -> list[str]:
        return self.ids.to_pylist()

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, example_ids) -> np.ndarray:
        """Row positions of `example_ids` (a list or an Arrow array) in the pool. An id the pool lacks is a
        KeyError that names it."""
        ids = as_id_array(example_ids)
        if len(ids) == len(self) and ids.equals(self.ids):
            return np.arange(len(self))
        # One pass over the pool's ids against a hash of the (usually few) asked ones, then a lookup among the
        # rows found: a hash of every pool id (index_in's value_set) would be ~90 bytes a row at 10M rows.
        found = np.flatnonzero(pc.is_in(self.ids, value_set=ids).to_numpy(zero_copy_only=False))
        at = pc.index_in(ids, value_set=self.ids.take(pa.array(found, pa.int64())))
        if at.null_count:
            missing = pc.filter(ids, pc.is_null(at)).to_pylist()
            raise KeyError(f"{len(missing)} example id(s) are not in the pool {self.source} (e.g. {missing[:3]})")
        return found[at.to_numpy(zero_copy_only=False)]

    def rows(self, example_ids, columns: list[str]) -> pa.Table:
        """The pool's `columns` for `example_ids`, in that order: only the row groups that hold them are read."""
        at = self.positions(example_ids)
        out = {}
        for path, has in ((self.inputs_path, ("example_id", "prompt")), (self.labels_path, ("label", "target"))):
            wanted = [c for c in columns if c in has]
            if wanted:
                part = _read_rows(path, at, self.row_group_rows, wanted)
                out.update({c: part.column(c) for c in wanted})
        unknown = set(columns) - set(out)
        if unknown:
            raise KeyError(f"a pool has no column(s) {sorted(unknown)}; it has {POOL_SCHEMA.names}")
        return pa.table({c: out[c] for c in columns})

    @property
    def table(self) -> pa.Table:
        """The whole pool in memory (small pools, tests). Large-pool code paths use `rows` instead."""
        inputs = pq.read_table(self.inputs_path, columns=["example_id", "prompt"])
        labels = pq.read_table(self.labels_path, columns=["label", "target"])
        return pa.table([inputs.column("example_id"), inputs.column("prompt"), labels.column("label"),
                         labels.column("target")], schema=POOL_SCHEMA)

    def for_scoring(self) -> pa.Table:
        """The only view of the pool a scorer gets, in memory: ids and prompts, never labels."""
        return pq.read_table(self.inputs_path, columns=SCORER_COLUMNS)

    def scoring_input(self, example_ids=None, rows: Optional[np.ndarray] = None) -> "ScoringInput":
        """What scorers read for `example_ids`, or for the rows at positions `rows` (ascending), default every
        row: inputs.parquet and row positions in it. The whole pool shares the pool's own arrays."""
        at = np.sort(self.positions(example_ids)) if rows is None and example_ids is not None else rows
        if at is None or len(at) == len(self):
            return ScoringInput(str(self.inputs_path), self.row_group_rows, np.arange(len(self)), self.n_chars, self.ids)
        return ScoringInput(str(self.inputs_path), self.row_group_rows, at, self.n_chars[at], self.ids)

    def rows_without(self, example_ids) -> np.ndarray:
        """Positions (ascending) of the rows whose example_id is not in `example_ids`: the unlabelled rows,
        found by one pass over the pool's ids against a set of the (few) labelled ones, with no index of
        the pool's ids (at 10M rows that index would be the driver's largest allocation)."""
        labelled = pc.is_in(self.ids, value_set=as_id_array(example_ids))
        return np.flatnonzero(~labelled.to_numpy(zero_copy_only=False))


@dataclass(frozen=True)
class ScoringInput:
    """Rows for the scorers, by reference: the label-free inputs file, the rows' positions in it (ascending),
    their prompt lengths in characters, and the file's whole example_id column (`file_ids`, shared with
    the pool: the rows' own ids are taken from it only where asked for). The scorers read the prompts
    themselves."""
    path: str
    row_group_rows: int
    positions: np.ndarray
    n_chars: np.ndarray
    file_ids: pa.Array

    @property
    def num_rows(self) -> int:
        return len(self.positions)

    @property
    def example_ids(self) -> pa.Array:
        """The rows' example_ids, in their order (the file's own array when the rows are all of it)."""
        return self.ids_slice(0, self.num_rows)

    def ids_slice(self, start: int, length: int) -> pa.Array:
        """The example_ids of rows start .. start + length: a row group's at a time costs no pool-sized copy."""
        if self.num_rows == len(self.file_ids):
            return self.file_ids.slice(start, length)
        return self.file_ids.take(pa.array(self.positions[start:start + length], pa.int64()))

    def filter(self, mask: pa.Array) -> "ScoringInput":
        """The rows where the boolean `mask` is true."""
        keep = mask.to_numpy(zero_copy_only=False)
        return dataclasses.replace(self, positions=self.positions[keep], n_chars=self.n_chars[keep])


def _read_index(path: Path) -> tuple[pa.Array, np.ndarray]:
    """A pool file's example_id column (one Arrow array) and prompt lengths, read as one record batch: a
    table of row-group chunks combined afterwards would hold the ids twice (at 2M rows the open pool's RSS
    grew ~61 bytes a row that way, ~43 this way, for 24 bytes of data)."""
    f = pq.ParquetFile(path, pre_buffer=False)
    batches = list(f.iter_batches(batch_size=max(1, f.metadata.num_rows), columns=["example_id", "n_chars"],
                                  use_threads=False))
    if not batches:
        return pa.array([], pa.string()), np.empty(0, np.int32)
    if len(batches) == 1:
        return batches[0].column(0), batches[0].column(1).to_numpy()
    table = pa.Table.from_batches(batches)  # a reader that split the file: combined, as before
    return table.column(0).combine_chunks(), table.column(1).to_numpy()


def as_id_array(example_ids) -> pa.Array:
    if isinstance(example_ids, pa.ChunkedArray):
        return example_ids.combine_chunks()
    return example_ids if isinstance(example_ids, pa.Array) else pa.array(list(example_ids), pa.string())


def row_group_of(positions: np.ndarray, row_group_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(row group, offset in it) of each row position of a pool file: the one place positions become
    row-group coordinates (every row group but the last holds exactly `row_group_rows` rows)."""
    return np.divmod(positions, row_group_rows)


def _row_groups(path: Path):
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(i) for i in range(meta.num_row_groups)]


def _read_rows(path: Path, at: np.ndarray, row_group_rows: int, columns: list[str]) -> pa.Table:
    """Rows `at` (positions, any order) of a file written in row groups of `row_group_rows`: reads only the
    row groups that hold them."""
    group, offset = row_group_of(at, row_group_rows)
    groups = np.unique(group)
    table = pq.ParquetFile(path).read_row_groups(groups.tolist(), columns=columns)
    return table.take(pa.array(np.searchsorted(groups, group) * row_group_rows + offset, pa.int64()))


def write_inputs(table: pa.Table, directory: str | Path, row_group_rows: int = ROW_GROUP_ROWS) -> ScoringInput:
    """An in-memory (example_id, prompt) table as a scorer input file in `directory`: for rows that are not a
    pool's (benchmarks, tests, `PoolScorer.score` given a table)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = table.select(SCORER_COLUMNS).cast(pa.schema([("example_id", pa.string()), ("prompt", pa.string())]))
    inputs = table.append_column("n_chars", pc.utf8_length(table.column("prompt")).cast(pa.int32()))
    pq.write_table(inputs, directory / "inputs.parquet", row_group_size=row_group_rows)
    n = table.num_rows
    return ScoringInput(str(directory / "inputs.parquet"), row_group_rows, np.arange(n),
                        inputs.column("n_chars").to_numpy(), table.column("example_id").combine_chunks())


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


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        batches = iter_batches(path, ROW_GROUP_ROWS)  # a batch at a time: never the whole file in memory
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    line = 1
    for batch in batches:
        for row in batch.to_pylist():
            yield line, row
            line += 1


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


def _load_hf(spec: str):
    parts = spec[len("hf:"):].split(":")
    if len(parts) not in (2, 3):
        raise DataError(f"{spec}: expected hf:<dataset id>[:<config>]:<split>")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline misses, unknown ids/splits and hub errors all come as different types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (deft is offline: set data.allow_download: true to fetch it)" if offline else ""
        raise DataError(f"{spec}: cannot load the dataset: {first}{hint}") from None


def _read_hf(spec: str) -> Iterator[tuple[int, dict]]:
    for i, row in enumerate(_load_hf(spec)):
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
        yield from _read_parquet(path)
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
    cache_dir: Optional[str | Path] = None,
) -> Pool:
    """Load and validate a pool. Raises DataError listing every bad row unless on_bad_row == 'skip'.

    Rows are validated as they stream in and written, a row group at a time, to a Pool directory under
    `pools_dir(cache_dir)`, keyed by the source (path, size, mtime, ctime and inode; an `hf:` dataset's
    fingerprint), the task, these arguments and the code that turns rows into prompts and ids. The same
    source loads from there next time without being read again: a resumed run, or the runs of a `deft
    compare`. A source that fails writes nothing there. On a multi-node cluster `cache_dir`
    (`data.cache_dir`) must be storage every node sees: scorers read the pool's prompts from it.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row should be 'error' or 'skip', got {on_bad_row!r}")
    key = _pool_key(source, task, id_field, on_bad_row, limit, require_label, demo_size, seed, split)
    final = pools_dir(cache_dir) / key
    if (final / "meta.json").is_file():
        meta = json.loads((final / "meta.json").read_text())
        return Pool(final, source, [BadRowRecord(**b) for b in meta["skipped"]])
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep(final.parent)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}."))
    try:
        bad, good = _write_pool(tmp, source, task, id_field, limit, require_label, demo_size, seed, split,
                                drop_duplicates=on_bad_row == "skip")
        if bad and on_bad_row == "error":
            shown = "\n  ".join(str(b) for b in bad[:_SHOWN_ERRORS])
            more = f"\n  ... and {len(bad) - _SHOWN_ERRORS} more" if len(bad) > _SHOWN_ERRORS else ""
            raise DataError(
                f"{len(bad)} bad row(s) in {source}:\n  {shown}{more}\n"
                "Fix them, or set data.on_bad_row=skip to drop and count them."
            )
        if not good:
            raise DataError(f"{source}: no usable rows")
        meta = {"format": POOL_FORMAT, "source": source, "row_group_rows": ROW_GROUP_ROWS,
                "skipped": [dataclasses.asdict(b) for b in bad]}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, final)  # atomic: the directory is complete or absent
        except OSError:  # another process cached the same pool first: the same rows, keep theirs
            if not (final / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Pool(final, source, bad)


def pools_dir(cache_dir: Optional[str | Path] = None) -> Path:
    """Where validated pools are kept: data.cache_dir, else $DEFT_POOL_CACHE (the tests' scratch dir), else
    $DEFT_CACHE (or ~/.cache/deft), then pools/."""
    if not cache_dir and os.environ.get("DEFT_POOL_CACHE"):
        return Path(os.environ["DEFT_POOL_CACHE"])
    return Path(cache_dir or os.environ.get("DEFT_CACHE") or Path.home() / ".cache" / "deft") / "pools"


def sweep(directory: Path, older_than_s: float = 24 * 3600) -> None:
    """Remove what killed processes left in `directory`: half-written pools (`.<key>.*`) and scorers' parts
    of calls that never finished, once they are a day old (a live writer renames or removes its own)."""
    cutoff = time.time() - older_than_s
    for path in [*directory.glob(".*"), *directory.glob("*/scores/*")]:
        try:
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


# The code that turns a source's rows into prompts, labels and ids: a change to it must not reuse old pools.
_LOADER_CODE = hashlib.sha1(b"".join((Path(__file__).parent / f).read_bytes()
                                     for f in ("data.py", "tasks.py", "demo.py"))).hexdigest()


def _pool_key(source: str, task: Task, *args) -> str:
    """Names a cached pool: the same source (file: path, size, mtime, ctime, inode; `hf:`: the dataset's
    fingerprint), task, load arguments and loader code."""
    stamp = None
    if source.startswith("hf:"):
        stamp = _hf_fingerprint(source)
    elif source != "demo":
        try:
            st = Path(source).stat()
            stamp = [str(Path(source).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        except OSError:
            stamp = None  # a missing file: read_rows raises the error that names it
    blob = json.dumps([POOL_FORMAT, _LOADER_CODE, source, stamp, repr(task), *args], default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:20]


def _hf_fingerprint(spec: str) -> Optional[str]:
    """The loaded dataset's fingerprint (it changes with the data files); None where it cannot load, and
    then reading it raises the error that says why."""
    try:
        return _load_hf(spec)._fingerprint
    except DataError:
        return None


def _write_pool(out: Path, source: str, task: Task, id_field: Optional[str], limit: Optional[int],
                require_label: bool, demo_size: int, seed: int, split: str,
                drop_duplicates: bool) -> tuple[list[BadRowRecord], int]:
    """Validate the source row by row into out/inputs.parquet and out/labels.parquet (whole row groups of
    ROW_GROUP_ROWS); returns the bad rows and the number of good ones.

    Memory stays small whatever the source's size: rows are held a row group at a time, and duplicate ids
    are found at the end from a 64-bit hash of each id (`_repeated_rows`: 8 bytes a row, sorted), so the
    driver never builds a set or hash table of every id (at 10M rows a Python set would take about 1 GB,
    and Arrow's `count_distinct` over the id column ~90 bytes a row). With `limit` the ids are checked as
    they come (a set of at most `limit`), so that duplicates do not count toward the first `limit` good
    rows."""
    bad: list[BadRowRecord] = []
    pending: list[dict] = []
    lines = array("q")  # the source line of each good row: 8 bytes a row, for naming duplicates
    hashes = array("Q")  # a 64-bit hash of each good row's id: 8 bytes a row, for finding them
    seen: Optional[dict[str, int]] = {} if limit is not None else None
    writers = _PoolWriters(out)
    try:
        for line, row in read_rows(source, demo_size, seed, split):
            try:
                if isinstance(row, BadRow):
                    raise row
                example_id = _row_id(row, id_field, task.input_fields)
                if seen is not None and example_id in seen:
                    raise BadRow(id_field or "<row>", f"duplicate example_id {example_id!r} (first seen at line {seen[example_id]})")
                ex = task.example(row, require_label=require_label)
            except BadRow as e:
                bad.append(BadRowRecord(source, line, e.field, str(e).split(": ", 1)[1]))
                continue
            if seen is not None:
                seen[example_id] = line
            pending.append({"example_id": example_id, **ex})
            lines.append(line)
            hashes.append(_id_hash(example_id))
            if len(pending) == ROW_GROUP_ROWS:
                writers.write(pending)
                pending = []
            if limit is not None and len(lines) >= limit:
                break
        if pending:
            writers.write(pending)
    finally:
        writers.close()
    if not lines:
        return bad, 0
    good = len(lines)
    suspects = _repeated_rows(np.frombuffer(hashes, dtype=np.uint64))
    del hashes
    if len(suspects):
        lines_np = np.frombuffer(lines, dtype=np.int64)
        ids = _read_rows(out / "inputs.parquet", suspects, ROW_GROUP_ROWS, ["example_id"]).column("example_id")
        dupes = _duplicates(ids, lines_np[suspects])  # exact: rows whose ids only share a hash are not duplicates
        for line, example_id, first in dupes:
            bad.append(BadRowRecord(source, line, id_field or "<row>", f"duplicate example_id {example_id!r} (first seen at line {first})"))
        if drop_duplicates:
            _drop_lines(out, lines_np, np.asarray([d[0] for d in dupes]))
            good -= len(dupes)
        bad.sort(key=lambda b: b.line)
    return bad, good


class _PoolWriters:
    def __init__(self, out: Path):
        self.inputs = pq.ParquetWriter(out / "inputs.parquet", INPUTS_SCHEMA)
        self.labels = pq.ParquetWriter(out / "labels.parquet", LABELS_SCHEMA)

    def write(self, rows: list[dict]) -> None:
        t = pa.Table.from_pylist(rows, schema=POOL_SCHEMA)
        n_chars = pc.utf8_length(t.column("prompt")).cast(pa.int32())
        self.inputs.write_table(pa.table([t.column("example_id"), t.column("prompt"), n_chars], schema=INPUTS_SCHEMA),
                                row_group_size=ROW_GROUP_ROWS)
        self.labels.write_table(t.select(LABELS_SCHEMA.names), row_group_size=ROW_GROUP_ROWS)

    def close(self) -> None:
        self.inputs.close()
        self.labels.close()


def _id_hash(example_id: str) -> int:
    """A 64-bit hash of an id, the same in every process (Python's `hash` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(example_id.encode(), digest_size=8).digest(), "little")


def _repeated_rows(hashes: np.ndarray) -> np.ndarray:
    """Positions (ascending) of the rows whose hash another row shares: every duplicate id is among them,
    and, rarely, ids that only share a hash. Sorting a copy of the hashes costs 8 bytes a row, for a moment."""
    ordered = np.sort(hashes)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    return np.flatnonzero(np.isin(hashes, repeated)) if len(repeated) else np.empty(0, np.int64)


def _duplicates(ids: pa.ChunkedArray, lines: np.ndarray) -> list[tuple[int, str, int]]:
    """(line, id, first line) for every row whose id an earlier row already has."""
    t = pa.table({"example_id": ids, "line": lines})
    counts = t.group_by("example_id").aggregate([("line", "min"), ("line", "count")])
    repeated = counts.filter(pc.greater(counts.column("line_count"), 1))
    if repeated.num_rows == 0:
        return []
    first = dict(zip(repeated.column("example_id").to_pylist(), repeated.column("line_min").to_pylist()))
    rows = t.filter(pc.is_in(t.column("example_id"), value_set=repeated.column("example_id"))).to_pylist()
    return [(r["line"], r["example_id"], first[r["example_id"]]) for r in rows if r["line"] != first[r["example_id"]]]


def _drop_lines(out: Path, lines: np.ndarray, drop: np.ndarray) -> None:
    """Rewrite both files without the rows of source lines `drop` (duplicates, with on_bad_row=skip), a
    row group at a time, into whole row groups of ROW_GROUP_ROWS again."""
    keep = ~np.isin(lines, drop)
    for name, schema in (("inputs.parquet", INPUTS_SCHEMA), ("labels.parquet", LABELS_SCHEMA)):
        src = pq.ParquetFile(out / name)
        pending, start = [], 0
        with pq.ParquetWriter(out / f"{name}.new", schema) as writer:
            for g in range(src.num_row_groups):
                group = src.read_row_group(g)
                pending.append(group.filter(pa.array(keep[start:start + group.num_rows])))
                start += group.num_rows
                if sum(t.num_rows for t in pending) >= ROW_GROUP_ROWS:
                    table = pa.concat_tables(pending)
                    whole = table.num_rows - table.num_rows % ROW_GROUP_ROWS
                    writer.write_table(table.slice(0, whole), row_group_size=ROW_GROUP_ROWS)
                    pending = [table.slice(whole)]
            if pending and sum(t.num_rows for t in pending):
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
        os.replace(out / f"{name}.new", out / name)


def pool_from_config(data, task: Task, seed: int, require_label: bool) -> Pool:
    """The pool a DataConfig names: data.path, cut to data.limit rows."""
    return load_pool(data.path, task, id_field=data.id_field, on_bad_row=data.on_bad_row, limit=data.limit,
                     require_label=require_label, demo_size=data.demo_size, seed=seed, cache_dir=data.cache_dir)


def eval_split_from_config(data, task: Task, seed: int, eval_limit: Optional[int]) -> Optional[Pool]:
    """The evaluation split (data.test_path), cut to al.eval_limit rows only: data.limit is for the pool."""
    if not data.test_path:
        return None
    return load_pool(data.test_path, task, id_field=data.id_field, on_bad_row=data.on_bad_row, limit=eval_limit,
                     require_label=True, demo_size=data.demo_size, seed=seed, split="test", cache_dir=data.cache_dir)
