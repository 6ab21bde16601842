"""The driver's streamed reads of large Parquet files: a column, chosen rows, rows by id, a batch at a time."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.io as io
from pipeline.io import iter_rows_at, read_floats, rows_with_ids, take_rows


@pytest.fixture
def scores(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "BATCH_ROWS", 3)  # batches that cut across the file's row groups of 4
    table = pa.table({"example_id": [f"e{i}" for i in range(10)],
                      "score": pa.array([float(i) if i != 4 else None for i in range(10)], pa.float32())})
    pq.write_table(table, tmp_path / "s.parquet", row_group_size=4)
    return tmp_path / "s.parquet"


def test_take_rows_keeps_the_asked_order(scores):
    assert take_rows(scores, [9, 0, 5, 5, 3], ["example_id"]).column("example_id").to_pylist() == ["e9", "e0", "e5", "e5", "e3"]
    assert take_rows(scores, [], ["example_id"]).num_rows == 0
    with pytest.raises(IndexError, match="has 10 rows; asked for row 10"):
        take_rows(scores, [2, 10], ["example_id"])


def test_read_floats_is_float64_with_nan_for_null(scores):
    values = read_floats(scores, "score")
    assert values.dtype == np.float64 and values.flags.writeable
    assert np.isnan(values[4]) and np.array_equal(np.delete(values, 4), np.delete(np.arange(10.0), 4))


def test_rows_with_ids_in_file_order(scores):
    got = rows_with_ids(scores, pa.array(["e7", "e1", "nope"]), ["example_id", "score"])
    assert got.to_pylist() == [{"example_id": "e1", "score": 1.0}, {"example_id": "e7", "score": 7.0}]


def test_iter_rows_at_streams_chunks_of_the_asked_rows(scores):
    chunks = list(iter_rows_at(scores, np.array([0, 2, 3, 4, 7, 9]), ["example_id"], 4))
    assert [c.column("example_id").to_pylist() for c in chunks] == [["e0", "e2", "e3", "e4"], ["e7", "e9"]]
    assert list(iter_rows_at(scores, np.array([], np.int64), ["example_id"], 4)) == []
    with pytest.raises(IndexError, match="asked for row 12"):
        list(iter_rows_at(scores, np.array([1, 12]), ["example_id"], 4))
