"""Scoring through local Ray with 2 long-lived actors: exactly one score per example_id, the same numbers
as single-process scoring, and u_base computed once and cached."""
import pyarrow as pa
import pytest
import torch

from actors.model import adapter_state
from actors.scorer import Scorer
from pipeline.data import load_pool
from pipeline.io import read_parquet, write_parquet
from pipeline.scoring import PoolScorer, ScoringError, base_uncertainty, length_sorted_blocks
from pipeline.tasks import demo

from conftest import scorer_kwargs, tiny_config, trained_like_adapter

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cfg(tiny_model_dir):
    return tiny_config(tiny_model_dir)


@pytest.fixture(scope="module")
def pool_table():
    return load_pool("demo", demo(), demo_size=41).for_scoring()  # 41: blocks of 4 leave a ragged one


@pytest.fixture(scope="module")
def pool_scorer(ray_local, cfg, tiny_model_dir):
    ps = PoolScorer(cfg, tiny_model_dir)
    yield ps
    ps.shutdown()


@pytest.fixture(scope="module")
def local_scorer(cfg, tiny_model_dir):
    return Scorer(**scorer_kwargs(cfg, tiny_model_dir))


def _as_batch(table):
    return {k: table.column(k).to_pylist() for k in table.column_names}


def _blockwise(scorer, table, mode, rows):
    # Single-process reference that sees the same fixed blocks the actors see.
    parts = [pa.table(scorer.score(_as_batch(b), mode)) for b in length_sorted_blocks(table, rows)]
    out = pa.concat_tables(parts)
    index = {e: i for i, e in enumerate(out.column("example_id").to_pylist())}
    return out.take([index[e] for e in table.column("example_id").to_pylist()])


def test_two_actors_each_do_work(pool_scorer):
    infos = pool_scorer.info()
    assert len(infos) == 2 and len({i["pid"] for i in infos}) == 2
    assert all(i["model_loads"] == 1 and i["threads"] == 1 for i in infos)


def test_exactly_one_score_per_example_and_equal_to_single_process(pool_scorer, local_scorer, pool_table):
    out = pool_scorer.score(pool_table, "base")
    ids = pool_table.column("example_id").to_pylist()
    assert out.column("example_id").to_pylist() == ids
    assert len(set(out.column("example_id").to_pylist())) == len(ids) == 41
    alone = local_scorer.score(_as_batch(pool_table), "base")
    assert torch.allclose(torch.tensor(out.column("entropy").to_pylist()), torch.tensor(alone["entropy"]), atol=1e-5)
    assert out.column("prediction").to_pylist() == alone["prediction"]


def test_mc_scores_do_not_depend_on_which_actor_scored(pool_scorer, local_scorer, pool_table, cfg):
    state = trained_like_adapter(adapter_state(local_scorer.model))
    pool_scorer.set_adapter(state)
    local_scorer.set_adapter(state)
    out = pool_scorer.score(pool_table, "lora")
    ref = _blockwise(local_scorer, pool_table, "lora", cfg.scoring.batch_size)
    assert min(out.column("bald").to_pylist()) > 0
    assert torch.allclose(torch.tensor(out.column("bald").to_pylist()), torch.tensor(ref.column("bald").to_pylist()), atol=1e-6)
    assert [i["adapter_version"] for i in pool_scorer.info()] == [1, 1]


def test_scorers_reject_tables_with_labels(pool_scorer, pool_table):
    with pytest.raises(ScoringError, match="exactly"):
        pool_scorer.score(pool_table.append_column("label", pa.array(["true"] * pool_table.num_rows)), "base")


def test_base_uncertainty_is_cached(pool_scorer, pool_table, tmp_path):
    cache = tmp_path / "base_uncertainty.parquet"
    first = base_uncertainty(pool_scorer, pool_table.slice(0, 30), cache)
    assert read_parquet(cache).num_rows == 30

    again = base_uncertainty(NoScoring(), pool_table.slice(0, 30), cache)
    assert again.column("entropy").to_pylist() == first.column("entropy").to_pylist()
    counting = Counting(pool_scorer)
    grown = base_uncertainty(counting, pool_table, cache)
    assert counting.rows == 11 and grown.num_rows == 41 and read_parquet(cache).num_rows == 41  # only the new rows
    # One measure back to the driver; the cache keeps every column (what deft compare shares between runs).
    narrow = base_uncertainty(NoScoring(), pool_table.slice(5, 20), cache, columns=["entropy"])
    assert narrow.column_names == ["example_id", "entropy"]
    assert narrow.column("entropy").to_pylist() == grown.column("entropy").to_pylist()[5:25]
    assert {"entropy", "bald", "probs", "prediction", "confidence"} <= set(read_parquet(cache).column_names)


class NoScoring:
    def score(self, table, mode, **kw):
        raise AssertionError(f"rescored {table.num_rows} rows")

    score_to_file = score


class Counting:
    """A scorer that counts the rows it is asked to score."""

    def __init__(self, scorer):
        self.scorer, self.rows = scorer, 0

    def score_to_file(self, inputs, mode, path, **kw):
        self.rows += inputs.num_rows
        return self.scorer.score_to_file(inputs, mode, path, **kw)


def test_base_rows_any_run_scored_come_from_the_shared_file(pool_scorer, pool_table, tmp_path):
    shared = tmp_path / "base_scores.parquet"
    a = base_uncertainty(pool_scorer, pool_table.slice(0, 20), tmp_path / "a.parquet", shared)
    counting = Counting(pool_scorer)
    b = base_uncertainty(counting, pool_table.slice(10, 20), tmp_path / "b.parquet", shared)
    assert counting.rows == 10  # rows 10-19 were copied from the shared file
    assert read_parquet(shared).num_rows == 30 and read_parquet(tmp_path / "b.parquet").num_rows == 20
    assert b.column("entropy").to_pylist()[:10] == a.column("entropy").to_pylist()[10:]
    # the base model's evaluation: no run cache, everything from the shared file
    c = base_uncertainty(NoScoring(), pool_table.slice(0, 30), None, shared, columns=["prediction"])
    assert c.column_names == ["example_id", "prediction"] and c.column("example_id").to_pylist() == \
        pool_table.slice(0, 30).column("example_id").to_pylist()


def test_stream_into_unifies_the_parts_schemas(tmp_path):
    """A generation unit whose every answer failed to parse has a null-typed prediction column."""
    from pipeline.scoring import stream_into

    write_parquet(tmp_path / "a.parquet", pa.table({"example_id": ["a", "b"], "prediction": pa.nulls(2), "pe": [0.1, 0.2]}))
    write_parquet(tmp_path / "b.parquet", pa.table({"example_id": ["c"], "prediction": ["7"], "pe": [0.3]}))
    stream_into(tmp_path / "out.parquet", [(tmp_path / "a.parquet", None),
                                           (tmp_path / "b.parquet", lambda t: t.filter(pa.array([True])))],
                batch_rows=1)
    out = read_parquet(tmp_path / "out.parquet")
    assert out.schema.field("prediction").type == pa.string()
    assert out.to_pylist() == [{"example_id": "a", "prediction": None, "pe": 0.1},
                               {"example_id": "b", "prediction": None, "pe": 0.2},
                               {"example_id": "c", "prediction": "7", "pe": 0.3}]


def _write_parts(ids, units, folder, row_group_rows, swap=None):
    """Each unit's part as a scorer writes it (its rows in offset order; `ids` by position in the file),
    its score the row's position; `swap` (a unit index) writes that unit's first two rows the wrong way round."""
    import numpy as np

    from pipeline.io import write_parquet

    for u in units:
        rows = [u.group * row_group_rows + int(o) for o in u.offsets]
        if u.index == swap:
            rows[:2] = rows[1::-1]
        write_parquet(folder / f"part-{u.index:06d}.parquet",
                      pa.table({"example_id": [ids[r] for r in rows], "score": np.array(rows, float)}))


def test_the_scorers_parts_come_back_in_the_asked_order_and_losses_are_errors(tmp_path):
    from pipeline.data import write_inputs
    from pipeline.scoring import _in_input_order, plan_units

    table = pa.table({"example_id": [f"r{i}" for i in range(41)], "prompt": ["x" * (i * 7 % 13 + 1) for i in range(41)]})
    inp = write_inputs(table, tmp_path / "in", row_group_rows=16)  # 41 rows: row groups of 16, 16, 9
    asked = inp.filter(pa.array([i % 3 != 1 for i in range(41)]))  # a subset, as the loop asks for
    units = plan_units(asked, 4, 2)
    assert any(list(u.offsets) != sorted(u.offsets) for u in units)  # scorers get rows longest first
    out = tmp_path / "parts"
    out.mkdir()
    _write_parts(table.column("example_id").to_pylist(), units, out, 16)
    back = pa.concat_tables(list(_in_input_order(asked, out, units)))
    assert back.column("example_id").to_pylist() == asked.example_ids.to_pylist()
    assert back.column("score").to_pylist() == [float(p) for p in asked.positions]
    _write_parts(table.column("example_id").to_pylist(), units, out, 16, swap=units[0].index)  # a part whose rows are not the unit's
    with pytest.raises(ScoringError, match="mixed up rows in row group"):
        list(_in_input_order(asked, out, units))
    _write_parts(table.column("example_id").to_pylist(), units, out, 16)
    part = out / f"part-{units[0].index:06d}.parquet"
    write_parquet(part, read_parquet(part).slice(1))  # a part one row short
    with pytest.raises(ScoringError, match="lost or duplicated rows in row group"):
        list(_in_input_order(asked, out, units))
    _write_parts(table.column("example_id").to_pylist(), units, out, 16)
    (out / f"part-{units[-1].index:06d}.parquet").unlink()  # a part that never came
    with pytest.raises(ScoringError, match="a scorer's part is missing"):
        list(_in_input_order(asked, out, units))


def _micro_batches(units, bs):
    return sorted((u.group, tuple(u.offsets[i:i + bs])) for u in units for i in range(0, u.rows, bs))


def test_units_cover_every_row_once_and_their_micro_batches_do_not_depend_on_the_actors(pool_table, tmp_path):
    from pipeline.data import write_inputs
    from pipeline.scoring import plan_units

    inp = write_inputs(pool_table, tmp_path, row_group_rows=16)  # 41 rows: row groups of 16, 16 and 9
    one, four = plan_units(inp, 4, 1), plan_units(inp, 4, 4)
    assert len(four) > len(one) >= 3  # more actors, smaller units; never across a row group
    for units in (one, four):
        rows = sorted(u.group * 16 + int(o) for u in units for o in u.offsets)
        assert rows == list(range(41))
        assert [u.index for u in units] == list(range(len(units))) and all(u.offsets.max() < 16 for u in units)
    assert _micro_batches(one, 4) == _micro_batches(four, 4)  # the same batch-mates, so the same MC masks
    lengths = inp.n_chars
    for group, batch in _micro_batches(one, 4):  # each row group is cut longest first
        assert list(lengths[[group * 16 + o for o in batch]]) == sorted(lengths[[group * 16 + o for o in batch]], reverse=True)


def test_a_pool_of_several_row_groups_scores_like_single_process_per_group(pool_scorer, local_scorer, pool_table, cfg, tmp_path):
    from pipeline.data import write_inputs

    state = trained_like_adapter(adapter_state(local_scorer.model), seed=1)
    pool_scorer.set_adapter(state)
    local_scorer.set_adapter(state)
    inp = write_inputs(pool_table, tmp_path, row_group_rows=16)
    out = pool_scorer.score(inp, "lora", columns=["bald"])
    assert out.column_names == ["example_id", "bald"]
    assert out.column("example_id").to_pylist() == pool_table.column("example_id").to_pylist()
    ref = pa.concat_tables([_blockwise(local_scorer, pool_table.slice(g, 16), "lora", cfg.scoring.batch_size)
                            for g in (0, 16, 32)])
    assert torch.allclose(torch.tensor(out.column("bald").to_pylist()), torch.tensor(ref.column("bald").to_pylist()), atol=1e-6)
    assert not any((tmp_path / "scores").iterdir())  # the scorers' Parquet parts are gone once read
