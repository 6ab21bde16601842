"""Every strategy through the real loop (tiny model, local Ray scorers, 2 rounds), on a 4-way verbalizer
task and on a generation task: each round-1 `score` must be the named measure's own column (or the
STAR / subtract mix of the two), and the selected rows must be its top b."""
import json

import numpy as np
import pytest

from pipeline.config import STRATEGY_NAMES
from pipeline.io import read_parquet
from pipeline.loop import ActiveLearningRun
from pipeline.run_dir import RunDir
from pipeline.scoring import PoolScorer

from conftest import tiny_config

pytestmark = pytest.mark.integration

VERBALIZER = list(STRATEGY_NAMES)
GENERATION = ["random", "star", "subtract", "entropy", "pe", "least_confidence"]
COLUMN = {"verbalizer": {"entropy": "entropy", "pe": "pe", "least_confidence": "least_confidence", "margin": "margin",
                         "bald": "bald", "star": "entropy", "subtract": "entropy"},
          "generation": {"entropy": "me", "pe": "pe", "least_confidence": "least_confidence", "star": "pe", "subtract": "pe"}}


@pytest.fixture(scope="module")
def four_way_pool(tmp_path_factory):
    """40 questions with 4 answers: on 4 classes entropy, least confidence and margin rank differently."""
    from pipeline.demo import demo_rows

    path = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    rows = [{"question": r["question"], "answer": "ABCD"[i % 4]} for i, r in enumerate(demo_rows(40, seed=3))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def task_sections(kind, pool):
    if kind == "verbalizer":
        return {"task": {"name": "custom", "labels": ["A", "B", "C", "D"], "label_words": ["A", "B", "C", "D"],
                         "prompt_template": "{question}\nThe correct answer is:"},
                "data": {"path": pool}}
    return {"task": {"name": "custom", "kind": "generation", "prompt_template": "{question}\nAnswer:",
                     "answer_regex": r"answer is (\w+)", "max_new_tokens": 4},
            "data": {"path": "demo", "demo_size": 40}}


def config(model_dir, kind, pool, strategy):
    return tiny_config(model_dir, **task_sections(kind, pool),
                       al={"strategy": strategy, "initial_size": 6, "batch_size": 5, "rounds": 2, "evaluate_base": False},
                       train={"epochs": 2, "lr": 3e-3, "batch_size": 4, "backend": "local"})


@pytest.fixture(scope="module")
def scorers(ray_local, tiny_model_dir, four_way_pool):
    made = {kind: PoolScorer(config(tiny_model_dir, kind, four_way_pool, "star"), tiny_model_dir)
            for kind in ("verbalizer", "generation")}
    yield made
    for s in made.values():
        s.shutdown()


def norm(x):
    x = np.asarray(x, dtype=np.float64)
    return (x - x.min()) / (x.max() - x.min())


CASES = [("verbalizer", s) for s in VERBALIZER] + [("generation", s) for s in GENERATION]


@pytest.mark.parametrize("kind,strategy", CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_every_strategy_selects_by_its_own_measure(tiny_model_dir, four_way_pool, scorers, tmp_path, kind, strategy):
    run = ActiveLearningRun(config(tiny_model_dir, kind, four_way_pool, strategy), tmp_path / "run", scorer=scorers[kind])
    metrics = run.run()
    rd = RunDir(tmp_path / "run")
    assert [m["labels"] for m in metrics] == [6, 11]
    scores = read_parquet(rd.scores_file(1)).to_pydict()
    selected = read_parquet(rd.selected_file(1)).column("example_id").to_pylist()
    score = np.array(scores["score"])
    if strategy == "random":  # nothing is scored: no adapter pass, no base pass
        assert set(scores) == {"example_id", "u_lora", "u_base", "score", "prediction", "confidence"}
        assert all(v is None for v in scores["u_lora"] + scores["u_base"] + scores["prediction"] + scores["confidence"])
        assert metrics[1]["lambda"] is None
    else:
        column = np.array(scores[f"lora_{COLUMN[kind][strategy]}"])
        assert np.array_equal(np.array(scores["u_lora"]), column)
        if strategy == "star":  # adapter 0 selects round 1: λ = 0.1
            assert metrics[1]["lambda"] == pytest.approx(0.1)
            assert score == pytest.approx(0.1 * norm(column) + 0.9 * norm(scores["u_base"]))
        elif strategy == "subtract":
            assert score == pytest.approx(norm(column) - norm(scores["u_base"]))
        else:
            assert np.array_equal(score, column)
    by_id = dict(zip(scores["example_id"], score))
    chosen = [by_id[e] for e in selected]
    rest = [v for e, v in by_id.items() if e not in set(selected)]
    assert len(selected) == 5 and min(chosen) >= max(rest)  # the top 5 by the strategy's score
    assert metrics[0]["lambda"] is None  # the cold start uses no λ


def test_measure_columns_really_differ_on_four_classes(tiny_model_dir, four_way_pool, scorers, tmp_path):
    """On 4 classes the measures are different functions: their round-1 top-5 sets are not all one set."""
    run = ActiveLearningRun(config(tiny_model_dir, "verbalizer", four_way_pool, "entropy"), tmp_path / "run",
                            scorer=scorers["verbalizer"])
    run.run()
    scores = read_parquet(RunDir(tmp_path / "run").scores_file(1)).to_pydict()
    ids = scores["example_id"]
    tops = {m: frozenset(ids[i] for i in np.argsort(-np.array(scores[f"lora_{m}"]), kind="stable")[:5])
            for m in ("entropy", "least_confidence", "margin", "bald")}
    assert len(set(tops.values())) >= 3, tops
