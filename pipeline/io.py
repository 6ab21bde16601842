"""Atomic writes: every state file is written to a temp file in the same directory, then os.replace'd.

A killed process leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(path: str | os.PathLike, table: pa.Table) -> Path:
    # Row groups of BATCH_ROWS: the writer buffers a row group's encoded columns (pyarrow's default, 1Mi
    # rows, held ~50 MB for a 2M-row scores file), and streamed reads hold about one row group.
    return atomic(path, lambda tmp: pq.write_table(table, tmp, row_group_size=BATCH_ROWS))


def read_parquet(path: str | os.PathLike) -> pa.Table:
    return pq.read_table(path)


# The driver reads and streams large Parquet files (a pool's ids, score files) with pyarrow's pre-buffering
# off. With it, pyarrow 26 reads the row groups' column chunks ahead: streaming a 2M-row base score file
# (every verbalizer column) a batch at a time took ~193 MB of Arrow memory at its peak, ~33 MB without;
# reading two of its columns whole grew the RSS by ~207 MB, ~159 MB without (measured on the file
# benchmarks.round_memory's stand-in scorer writes).


def iter_batches(path: str | os.PathLike, batch_size: int, columns: list[str] | None = None):
    """The record batches of a Parquet file, `batch_size` rows at a time, holding about one row group."""
    return pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=batch_size, columns=columns)


def read_columns(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Columns of a (large) Parquet file, whole."""
    return pq.read_table(path, columns=columns, pre_buffer=False)


BATCH_ROWS = 65_536  # rows a streamed read holds at once


def release_arrow_memory() -> None:
    """Hand the memory Arrow's allocator (mimalloc) keeps after large reads back to the system, so the next
    numpy allocations can use it: opening a 2M-row pool left ~49 MB that Arrow no longer used resident
    (~25 bytes a row). Cheap (milliseconds); called between the driver's large phases."""
    pa.default_memory_pool().release_unused()


def read_floats(path: str | os.PathLike, column: str) -> np.ndarray:
    """One numeric column of a (large) Parquet file as a float64 numpy array (nulls as NaN), filled a batch
    at a time: the driver holds 8 bytes a row and one batch, not an Arrow copy beside the numpy one."""
    out = np.empty(pq.ParquetFile(path).metadata.num_rows, dtype=np.float64)
    start = 0
    for batch in iter_batches(path, BATCH_ROWS, [column]):
        values = batch.column(0).cast(pa.float64()).to_numpy(zero_copy_only=False)
        out[start:start + len(values)] = values
        start += len(values)
    return out


def take_rows(path: str | os.PathLike, rows, columns: list[str]) -> pa.Table:
    """`columns` of the rows at positions `rows` (any order) of a (large) Parquet file, in that order,
    streamed a batch at a time (`iter_rows_at` on the sorted positions): only the wanted rows are kept."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    parts = list(iter_rows_at(path, rows[order], columns, max(1, len(rows))))
    table = parts[0] if parts else pq.read_schema(path).empty_table().select(columns)
    return table.take(pa.array(np.argsort(order, kind="stable"), pa.int64()))


def iter_rows_at(path: str | os.PathLike, positions: np.ndarray, columns: list[str], chunk: int):
    """Tables of `columns` for the rows at `positions` (ascending) of a (large) Parquet file, `chunk`
    positions at a time (the last may be shorter), streamed: only the taken rows are held."""
    pending, held, want, start = [], 0, 0, 0
    for batch in iter_batches(path, BATCH_ROWS, columns):
        end = start + batch.num_rows
        upto = int(np.searchsorted(positions, end))  # positions[want:upto] fall in this batch
        if upto > want:
            pending.append(pa.Table.from_batches([batch]).take(pa.array(positions[want:upto] - start, pa.int64())))
            held, want = held + upto - want, upto
        while held >= chunk:
            table = pa.concat_tables(pending)
            yield table.slice(0, chunk)
            pending, held = [table.slice(chunk)], held - chunk
        start = end
    if want != len(positions):
        raise IndexError(f"{path} has {start} rows; asked for row {int(positions[want])}")
    if held:
        yield pa.concat_tables(pending)


def rows_with_ids(path: str | os.PathLike, example_ids, columns: list[str]) -> pa.Table:
    """`columns` (example_id among them) of the rows of a (large) Parquet file whose example_id is one of
    `example_ids` (few), in the file's order, streamed a batch at a time."""
    import pyarrow.compute as pc

    value_set = pa.array(list(example_ids), pa.string()) if not isinstance(example_ids, pa.Array) else example_ids
    parts = [t.filter(pc.is_in(t.column("example_id"), value_set=value_set))
             for t in (pa.Table.from_batches([b]) for b in iter_batches(path, BATCH_ROWS, columns))]
    return pa.concat_tables(parts) if parts else pq.read_schema(path).empty_table().select(columns)
