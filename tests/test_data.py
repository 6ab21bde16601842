"""Pool loading: formats, stable example_ids, and bad rows reported with file and line."""
import json

import numpy as np

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import DataError, load_pool
from pipeline.tasks import boolq, gsm8k, obqa

from conftest import SHARED

Q = "Please answer the following question with true or false, question: is {}?\n\nAnswer format: true/false"


def row(i, label="true"):
    return {"question": Q.format(f"thing {i} real"), "answer": f"the correct answer is {label}"}


def write_jsonl(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


@pytest.fixture
def bad_file(tmp_path):
    return write_jsonl(
        tmp_path / "pool.jsonl",
        [
            row(1),                                    # line 1 ok
            {"answer": "the correct answer is true"},  # line 2 missing question
            {"question": "   ", "answer": "true"},     # line 3 empty text
            row(4, label="maybe"),                     # line 4 label outside the set
            row(1),                                    # line 5 duplicate of line 1
            '{"question": "broken',                    # line 6 undecodable JSON
            row(7, label="false"),                     # line 7 ok
        ],
    )


def test_bad_rows_fail_with_file_and_line(bad_file):
    with pytest.raises(DataError) as err:
        load_pool(str(bad_file), boolq())
    msg = str(err.value)
    assert "5 bad row(s)" in msg
    assert f"{bad_file}:2: field 'question': missing" in msg
    assert f"{bad_file}:3: field 'question': empty text" in msg
    assert f"{bad_file}:4: field 'answer': label 'the correct answer is maybe' is not in the label set" in msg
    assert f"{bad_file}:5: field '<row>': duplicate example_id" in msg and "first seen at line 1" in msg
    assert f"{bad_file}:6: field '<json>': undecodable JSON" in msg
    assert "data.on_bad_row=skip" in msg


def test_skip_drops_and_counts_bad_rows(bad_file):
    pool = load_pool(str(bad_file), boolq(), on_bad_row="skip")
    assert len(pool) == 2
    assert pool.table.column("label").to_pylist() == ["true", "false"]
    assert [b.line for b in pool.skipped] == [2, 3, 4, 5, 6]


def test_ids_are_stable_content_hashes_not_positions(tmp_path):
    rows = [row(i, "true" if i % 2 else "false") for i in range(6)]
    a = load_pool(str(write_jsonl(tmp_path / "a.jsonl", rows)), boolq())
    b = load_pool(str(write_jsonl(tmp_path / "b.jsonl", rows[::-1])), boolq())
    assert a.example_ids == b.example_ids[::-1]
    assert len(set(a.example_ids)) == 6


def test_id_field_is_used_and_checked(tmp_path):
    rows = [{**row(i), "uid": f"q{i}"} for i in range(3)] + [{**row(9), "uid": "q0"}]
    with pytest.raises(DataError, match=r":4: field 'uid': duplicate example_id 'q0'"):
        load_pool(str(write_jsonl(tmp_path / "p.jsonl", rows)), boolq(), id_field="uid")
    pool = load_pool(str(write_jsonl(tmp_path / "p.jsonl", rows[:3])), boolq(), id_field="uid")
    assert pool.example_ids == ["q0", "q1", "q2"]


def test_scorer_view_has_no_labels(tmp_path):
    pool = load_pool(str(write_jsonl(tmp_path / "p.jsonl", [row(1), row(2, "false")])), boolq())
    assert pool.for_scoring().column_names == ["example_id", "prompt"]


def test_parquet_and_csv(tmp_path):
    rows = [row(i) for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert len(load_pool(str(tmp_path / "p.parquet"), boolq())) == 3
    (tmp_path / "p.csv").write_text(
        'question,answer\n"Which?\nAnswerA x\nAnswerB y",B\n"Second, with a comma",Z\n"Third",C\n'
    )
    with pytest.raises(DataError, match=r"p.csv:5: field 'answer': label 'Z'"):  # the quoted field spans lines 2-4
        load_pool(str(tmp_path / "p.csv"), obqa())
    assert load_pool(str(tmp_path / "p.csv"), obqa(), on_bad_row="skip").table.column("label").to_pylist() == ["B", "C"]


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_pool(str(tmp_path / "none.jsonl"), boolq())
    (tmp_path / "p.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unknown format '.xml'"):
        load_pool(str(tmp_path / "p.xml"), boolq())


def test_demo_pool_is_seeded_and_balanced():
    a, b = load_pool("demo", boolq(), demo_size=50, seed=3), load_pool("demo", boolq(), demo_size=50, seed=3)
    assert a.example_ids == b.example_ids
    assert a.table.column("label").to_pylist().count("true") == 25


@pytest.mark.parametrize("task,name,n", [(boolq(), "boolq", 9427), (gsm8k(), "gsm8k", 7473)])
def test_shared_datasets_load(task, name, n):
    pool = load_pool(str(SHARED / name / "train.jsonl"), task)
    assert len(pool) == n


def test_obqa_train_has_duplicate_rows_that_skip_removes():
    with pytest.raises(DataError, match="5 bad row"):
        load_pool(str(SHARED / "obqa" / "train.jsonl"), obqa())
    assert len(load_pool(str(SHARED / "obqa" / "train.jsonl"), obqa(), on_bad_row="skip")) == 4952


def test_example_id_depends_on_the_input_fields_only(tmp_path):
    # Ids are seen by scorers and seed the dropout masks: one that hashed the answer would leak the label.
    a = load_pool(str(write_jsonl(tmp_path / "a.jsonl", [row(1, "true")])), boolq())
    b = load_pool(str(write_jsonl(tmp_path / "b.jsonl", [row(1, "false")])), boolq())
    c = load_pool(str(write_jsonl(tmp_path / "c.jsonl", [{**row(1), "note": "extra column"}])), boolq())
    assert a.example_ids == b.example_ids == c.example_ids


def test_the_same_question_with_two_answers_is_a_duplicate(tmp_path):
    with pytest.raises(DataError, match="duplicate example_id"):
        load_pool(str(write_jsonl(tmp_path / "p.jsonl", [row(1, "true"), row(1, "false")])), boolq())


def test_demo_pool_and_test_split_share_no_question():
    from pipeline.demo import demo_rows

    pool = {r["question"] for r in demo_rows(2000, seed=0)}
    test = {r["question"] for r in demo_rows(1000, seed=0, split="test")}
    assert len(pool) == 2000 and len(test) == 1000 and not pool & test
    answers = [r["answer"].split()[-1] for r in demo_rows(1000, split="test")]
    assert answers.count("true") == 500  # balanced


def test_data_limit_cuts_the_pool_not_the_test_split():
    from pipeline.config import DataConfig
    from pipeline.data import eval_split_from_config, pool_from_config
    from pipeline.tasks import demo

    data = DataConfig(path="demo", test_path="demo", demo_size=50, limit=10)
    assert len(pool_from_config(data, demo(), 0, require_label=True)) == 10
    assert len(eval_split_from_config(data, demo(), 0, eval_limit=None)) == 50
    assert len(eval_split_from_config(data, demo(), 0, eval_limit=7)) == 7


def test_rows_looks_up_ids_in_the_order_asked_and_names_a_missing_one():
    from pipeline.tasks import demo

    pool = load_pool("demo", demo(), demo_size=30)
    ids = pool.example_ids[::-1][:7]
    got = pool.rows(ids, ["example_id", "prompt", "target"])
    assert got.column("example_id").to_pylist() == ids
    by_id = {r["example_id"]: r for r in pool.table.to_pylist()}
    assert got.to_pylist() == [{k: by_id[e][k] for k in ("example_id", "prompt", "target")} for e in ids]
    assert pool.rows(pa.array(ids[:2]), ["prompt"]).num_rows == 2
    with pytest.raises(KeyError, match="'nope'"):
        pool.rows([ids[0], "nope"], ["prompt"])


# ---- the pool on disk: the driver keeps ids and lengths, prompts and labels stay in Parquet --------------

def test_a_pool_lives_in_two_parquet_files_and_scorers_read_the_label_free_one(tmp_path):
    pool = load_pool(str(write_jsonl(tmp_path / "p.jsonl", [row(i, "true" if i % 2 else "false") for i in range(9)])),
                     boolq(), cache_dir=tmp_path / "cache")
    assert pq.read_schema(pool.inputs_path).names == ["example_id", "prompt", "n_chars"]  # no label, no target
    assert pq.read_schema(pool.labels_path).names == ["example_id", "label", "target"]
    assert pool.table.column("label").to_pylist() == ["false", "true"] * 4 + ["false"]
    assert pool.n_chars.tolist() == [len(p) for p in pool.table.column("prompt").to_pylist()]
    inp = pool.scoring_input([pool.example_ids[5], pool.example_ids[2]])
    assert inp.positions.tolist() == [2, 5] and inp.example_ids.to_pylist() == [pool.example_ids[2], pool.example_ids[5]]


def test_rows_reads_across_row_groups(tmp_path, monkeypatch):
    import pipeline.data as data

    monkeypatch.setattr(data, "ROW_GROUP_ROWS", 4)
    pool = load_pool(str(write_jsonl(tmp_path / "p.jsonl", [row(i) for i in range(11)])), boolq(), cache_dir=tmp_path)
    assert pq.ParquetFile(pool.inputs_path).num_row_groups == 3 and pool.row_group_rows == 4
    ids = [pool.example_ids[i] for i in (10, 0, 5, 4, 9)]
    assert pool.rows(ids, ["example_id"]).column("example_id").to_pylist() == ids
    assert pool.rows(ids, ["prompt"]).column("prompt").to_pylist() == [boolq().prompt(row(i)) for i in (10, 0, 5, 4, 9)]


def test_a_loaded_pool_is_reused_until_its_file_changes(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [row(i) for i in range(5)])
    a = load_pool(str(path), boolq(), cache_dir=tmp_path / "cache")
    assert load_pool(str(path), boolq(), cache_dir=tmp_path / "cache").dir == a.dir
    assert load_pool(str(path), boolq(), cache_dir=tmp_path / "cache", limit=3).dir != a.dir  # other arguments
    write_jsonl(path, [row(i) for i in range(6)])
    b = load_pool(str(path), boolq(), cache_dir=tmp_path / "cache")
    assert b.dir != a.dir and len(b) == 6 and len(a) == 5


def test_a_bad_source_leaves_nothing_in_the_cache(tmp_path, bad_file):
    with pytest.raises(DataError):
        load_pool(str(bad_file), boolq(), cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "pools").iterdir()) == []


def test_skipped_duplicates_are_dropped_from_both_files(tmp_path, bad_file):
    pool = load_pool(str(bad_file), boolq(), on_bad_row="skip", cache_dir=tmp_path / "cache")
    assert len(pool) == 2 and pq.read_table(pool.labels_path).num_rows == 2
    again = load_pool(str(bad_file), boolq(), on_bad_row="skip", cache_dir=tmp_path / "cache")  # from the cache
    assert [b.line for b in again.skipped] == [2, 3, 4, 5, 6] and again.example_ids == pool.example_ids


def test_duplicates_do_not_count_toward_the_limit(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [row(0), row(0), row(1), row(2), row(3)])
    pool = load_pool(str(path), boolq(), on_bad_row="skip", limit=3, cache_dir=tmp_path)
    assert len(pool) == 3 and [b.line for b in pool.skipped] == [2]


def test_dropping_duplicates_keeps_whole_row_groups(tmp_path, monkeypatch):
    import pipeline.data as data

    monkeypatch.setattr(data, "ROW_GROUP_ROWS", 4)
    rows = [row(i % 7) for i in range(11)]  # lines 8-11 repeat lines 1-4
    pool = load_pool(str(write_jsonl(tmp_path / "p.jsonl", rows)), boolq(), on_bad_row="skip", cache_dir=tmp_path)
    assert len(pool) == 7 and [b.line for b in pool.skipped] == [8, 9, 10, 11]
    assert [pq.ParquetFile(p).metadata.row_group(0).num_rows for p in (pool.inputs_path, pool.labels_path)] == [4, 4]
    assert pool.rows([pool.example_ids[6]], ["prompt"]).column("prompt")[0].as_py() == boolq().prompt(row(6))


def test_ids_that_only_share_a_hash_are_not_duplicates(tmp_path, monkeypatch):
    """Duplicates are found by a 64-bit hash of each id, then confirmed on the ids themselves: with every
    hash made equal, distinct ids still load and the real duplicate is still the only one named."""
    import pipeline.data as data

    monkeypatch.setattr(data, "ROW_GROUP_ROWS", 2)  # the suspects are read back across row groups
    monkeypatch.setattr(data, "_id_hash", lambda example_id: 7)
    rows = [row(0), row(1), row(2), row(1), row(3)]  # line 4 repeats line 2
    pool = load_pool(str(write_jsonl(tmp_path / "p.jsonl", rows)), boolq(), on_bad_row="skip", cache_dir=tmp_path)
    assert len(pool) == 4 and [(b.line, "first seen at line 2" in b.message) for b in pool.skipped] == [(4, True)]
    assert len(set(pool.example_ids)) == 4


def test_repeated_rows_finds_every_shared_hash():
    from pipeline.data import _repeated_rows

    hashes = np.array([5, 2**64 - 1, 9, 5, 3, 2**64 - 1, 5], dtype=np.uint64)
    assert _repeated_rows(hashes).tolist() == [0, 1, 3, 5, 6]
    assert _repeated_rows(np.arange(10, dtype=np.uint64)).tolist() == []


def test_a_rewritten_file_of_the_same_size_and_mtime_is_read_again(tmp_path):
    import os

    path = write_jsonl(tmp_path / "p.jsonl", [row(1, "true")])
    st = path.stat()
    a = load_pool(str(path), boolq(), cache_dir=tmp_path)
    write_jsonl(path, [row(1, "fals")])  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime, as `cp -p` leaves it
    with pytest.raises(DataError, match="fals"):
        load_pool(str(path), boolq(), cache_dir=tmp_path)
    assert len(a) == 1


def test_sweep_removes_what_killed_loads_and_calls_left_once_old(tmp_path):
    import os

    from pipeline.data import sweep

    (tmp_path / ".abc.half").mkdir()
    (tmp_path / "abc" / "scores" / "lora-x").mkdir(parents=True)
    (tmp_path / ".fresh.half").mkdir()
    for p in (tmp_path / ".abc.half", tmp_path / "abc" / "scores" / "lora-x"):
        os.utime(p, (0, 0))
    sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fresh.half", "abc"]
    assert not any((tmp_path / "abc" / "scores").iterdir())
