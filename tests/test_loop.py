"""The active-learning loop through local Ray on a tiny random Llama: the run directory contract, the
same result after a kill at any phase, the human oracle round trip, and label-free scoring."""
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as deft
from pipeline.io import read_parquet
from pipeline.loop import ActiveLearningRun, NeedsLabels
from pipeline.run_dir import PHASES, RunDir, RunLocked
from pipeline.scoring import PoolScorer

from conftest import tiny_config

pytestmark = pytest.mark.integration


def loop_config(model_dir, **sections):
    base = dict(
        data={"path": "demo", "test_path": "demo", "demo_size": 40},
        al={"strategy": "star", "initial_size": 6, "batch_size": 5, "rounds": 2, "eval_limit": 12, "ece_bins": 10},
        train={"epochs": 2, "lr": 3e-3, "batch_size": 4, "backend": "local"},
    )
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return tiny_config(model_dir, **base)


@pytest.fixture(scope="module")
def scorer(ray_local, tiny_model_dir):
    ps = PoolScorer(loop_config(tiny_model_dir), tiny_model_dir)
    yield ps
    ps.shutdown()


def outcome(run_dir):
    run = RunDir(run_dir)
    labeled = run.read_labeled().sort_by("example_id").to_pylist()
    rounds = sorted(int(p.name) for p in (run.path / "rounds").iterdir())
    selected = {k: read_parquet(run.selected_file(k)).column("example_id").to_pylist() for k in rounds}
    return labeled, selected


@pytest.fixture(scope="module")
def reference(tiny_model_dir, scorer, tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "run"
    ActiveLearningRun(loop_config(tiny_model_dir), path, scorer=scorer).run()
    return path, outcome(path)


def test_full_two_round_loop(reference):
    # (the same loop under Ray Train + DeepSpeed, through the CLI: tests/test_console.py)
    rd = RunDir(reference[0])
    metrics = rd.read_metrics()
    assert rd.read_state().phase == "done"
    assert [m["round"] for m in metrics] == [0, 1] and [m["labels"] for m in metrics] == [6, 11]
    assert all(0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["ece"] <= 1.0 for m in metrics)
    assert metrics[0]["lambda"] is None and metrics[1]["lambda"] == pytest.approx(0.1)  # adapter 0 selects round 1
    for name in ("config.yaml", "state.json", "labeled.parquet", "base_uncertainty.parquet", "metrics.jsonl", "base_eval.json"):
        assert (rd.path / name).is_file(), name
    for k in (0, 1):
        assert rd.scores_file(k).is_file() and rd.selected_file(k).is_file()
        assert (rd.adapter_dir(k) / "adapter_model.safetensors").is_file()
    labeled = rd.read_labeled()
    assert labeled.column_names == ["example_id", "label", "round_added", "source"]
    assert labeled.column("round_added").to_pylist().count(1) == 5 and set(labeled.column("source").to_pylist()) == {"oracle"}
    scores1 = read_parquet(rd.scores_file(1))
    assert scores1.column_names == ["example_id", "u_lora", "u_base", "score", "lora_bald", "lora_entropy",
                                    "lora_least_confidence", "lora_margin", "lora_pe", "prediction", "confidence"]
    assert set(scores1.column("prediction").to_pylist()) <= {"true", "false"}  # the adapter's own answer
    assert scores1.num_rows == 40 - 6  # round 1 scores the unlabelled pool only
    assert deft(["report", str(rd.path)]) == 0
    assert rd.report_file.is_file() and rd.curve_file.stat().st_size > 0
    assert "| 1 | 11 |" in rd.report_file.read_text()


class Killed(BaseException):
    pass


def test_round_0_scores_written_a_batch_at_a_time_are_the_base_caches(tiny_model_dir, scorer, reference, tmp_path, monkeypatch):
    """Round 0's scores.parquet is written BATCH_ROWS at a time: with batches of 7 it is the same file as
    the reference run's (one batch), and each row holds its own base scores."""
    import pipeline.loop as loop

    monkeypatch.setattr(loop, "BATCH_ROWS", 7)

    def stop(k, phase, when):
        if (k, phase, when) == (0, "selecting", "after"):
            raise Killed()

    path = tmp_path / "run"
    with pytest.raises(Killed):
        ActiveLearningRun(loop_config(tiny_model_dir), path, hook=stop, scorer=scorer).run()
    mine = read_parquet(RunDir(path).scores_file(0))
    assert mine.num_rows == 40 and mine.equals(read_parquet(RunDir(reference[0]).scores_file(0)))
    base = {r["example_id"]: r for r in read_parquet(RunDir(path).base_uncertainty_file).to_pylist()}
    for r in mine.to_pylist():
        own = base[r["example_id"]]
        assert (r["u_base"], r["prediction"], r["confidence"], r["u_lora"]) == (own["entropy"], own["prediction"], own["confidence"], None)


def test_round_0_scores_from_a_base_cache_in_another_order(tiny_model_dir, scorer, reference, tmp_path):
    """Where the run's base cache holds the rows in another order than the pool's (as `deft compare`'s shared
    file can leave it), base's answers are placed by id instead of streamed by position: the same file."""
    from pipeline.io import write_parquet

    def stop_at(point):
        def hook(k, phase, when):
            if (k, phase, when) == point:
                raise Killed()
        return hook

    path = tmp_path / "run"
    with pytest.raises(Killed):
        ActiveLearningRun(loop_config(tiny_model_dir), path, hook=stop_at((0, "scoring", "before")), scorer=scorer).run()
    cached = read_parquet(RunDir(reference[0]).base_uncertainty_file)
    write_parquet(RunDir(path).base_uncertainty_file, cached.take(pa.array(range(cached.num_rows - 1, -1, -1))))
    with pytest.raises(Killed):
        ActiveLearningRun.open(path, scorer=scorer, hook=stop_at((0, "scoring", "after"))).resume()
    assert read_parquet(RunDir(path).scores_file(0)).equals(read_parquet(RunDir(reference[0]).scores_file(0)))


KILL_POINTS = [(k, phase, when) for k in (0, 1) for phase in PHASES[:-1] for when in ("before", "after")]


@pytest.mark.parametrize("k,phase,when", KILL_POINTS, ids=[f"r{k}-{p}-{w}" for k, p, w in KILL_POINTS])
def test_kill_and_resume_ends_like_an_uninterrupted_run(tiny_model_dir, scorer, reference, tmp_path, k, phase, when):
    def kill(round_, phase_, when_):
        if (round_, phase_, when_) == (k, phase, when):
            raise Killed()

    path = tmp_path / "run"
    with pytest.raises(Killed):
        ActiveLearningRun(loop_config(tiny_model_dir), path, hook=kill, scorer=scorer).run()
    state = RunDir(path).read_state()
    assert (state.round, state.phase) == (k, phase)  # the state never moved past the killed phase
    ActiveLearningRun.open(path, scorer=scorer).resume()
    assert outcome(path) == reference[1]


def test_a_second_driver_is_locked_out(tiny_model_dir, tmp_path):
    (tmp_path / "run").mkdir()
    rd = RunDir(tmp_path / "run").lock()
    try:
        with pytest.raises(RunLocked, match="in use by pid"):
            RunDir(tmp_path / "run").lock()
    finally:
        rd.unlock()


def test_run_refuses_an_existing_run_dir(tiny_model_dir, reference, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference[0], copy)
    with pytest.raises(FileExistsError, match="deft resume"):
        ActiveLearningRun(loop_config(tiny_model_dir), copy).run()


def test_scorers_never_see_labels(tiny_model_dir, scorer, tmp_path):
    seen = []

    class Spy:
        plan = scorer.plan

        def score(self, inputs, mode, **kw):  # scorers get the pool by reference: a file and row positions
            seen.append((mode, pq.read_schema(inputs.path).names))
            return scorer.score(inputs, mode, **kw)

        def score_to_file(self, inputs, mode, path, **kw):  # the same, with the scores kept on disk
            seen.append((mode, pq.read_schema(inputs.path).names))
            return scorer.score_to_file(inputs, mode, path, **kw)

        def set_adapter(self, state):
            return scorer.set_adapter(state)

    ActiveLearningRun(loop_config(tiny_model_dir), tmp_path / "run", scorer=Spy()).run()
    assert {mode for mode, _ in seen} == {"base", "lora", "eval"}  # every kind of call went through the spy
    assert all(cols == ["example_id", "prompt", "n_chars"] for _, cols in seen)


def _fill(path, labels_by_line):
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    for row, label in zip(rows, labels_by_line):
        row["label"] = label
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_human_oracle_export_bad_import_good_import_resume(tiny_model_dir, scorer, tmp_path, capsys):
    cfg = loop_config(tiny_model_dir, al={"oracle": "human", "rounds": 1, "initial_size": 4})
    path = tmp_path / "run"
    with pytest.raises(NeedsLabels, match="deft label import"):
        ActiveLearningRun(cfg, path, scorer=scorer).run()
    rd = RunDir(path)
    assert (rd.read_state().round, rd.read_state().phase) == (0, "labeling")
    to_label = rd.to_label_file(0)
    exported = [json.loads(l) for l in to_label.read_text().splitlines()]
    assert [r["label"] for r in exported] == [""] * 4 and all(set(r) == {"example_id", "prompt", "label"} for r in exported)

    bad = _fill(to_label, ["true", "maybe", "false", "true"])
    bad.append(dict(bad[0]))  # a duplicate
    bad.append({"example_id": "nope", "label": "true"})  # an unknown id
    assert deft(["label", "import", str(path), str(_write(tmp_path / "bad.jsonl", bad))]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: label 'maybe' is not in the label set" in err
    assert "bad.jsonl:5: duplicate example_id" in err and "bad.jsonl:6: unknown example_id 'nope'" in err
    assert not rd.imported_file(0).exists()  # a bad file changes nothing

    partial = _write(tmp_path / "partial.jsonl", _fill(to_label, ["true", "false", "", ""]))
    assert deft(["label", "import", str(path), str(partial)]) == 0
    with pytest.raises(NeedsLabels):  # 2 of 4 labelled and no --allow-partial: still waiting
        ActiveLearningRun.open(path, scorer=scorer).resume()
    rest = _write(tmp_path / "rest.jsonl", _fill(to_label, ["", "", "False", "true"]))
    assert deft(["label", "import", str(path), str(rest)]) == 0
    ActiveLearningRun.open(path, scorer=scorer).resume()
    labeled = rd.read_labeled().to_pylist()
    ids = [r["example_id"] for r in exported]
    assert {r["example_id"]: r["label"] for r in labeled} == dict(zip(ids, ["true", "false", "false", "true"]))
    assert {r["source"] for r in labeled} == {"human"} and rd.read_state().phase == "done"


def test_labels_filled_in_place_survive_export_and_are_imported(tiny_model_dir, scorer, tmp_path, capsys):
    """A person fills rounds/0/to_label.jsonl itself: export copies it (labels and all) and never rewrites
    it, a second export refuses to replace the copy that now holds labels, and import takes the file."""
    cfg = loop_config(tiny_model_dir, al={"oracle": "human", "rounds": 1, "initial_size": 4})
    path = tmp_path / "run"
    with pytest.raises(NeedsLabels):
        ActiveLearningRun(cfg, path, scorer=scorer).run()
    rd = RunDir(path)
    to_label = rd.to_label_file(0)
    _write(to_label, _fill(to_label, ["true", "false", "false", "true"]))  # filled in place
    filled = to_label.read_text()
    copy = tmp_path / "copy.jsonl"
    assert deft(["label", "export", str(path), "--out", str(copy)]) == 0
    assert to_label.read_text() == filled and copy.read_text() == filled  # 4 labels stay 4 labels

    assert deft(["label", "export", str(path), "--out", str(copy)]) == 2
    assert "holds 4 filled label(s); deft never overwrites labels" in capsys.readouterr().err
    assert copy.read_text() == filled

    assert deft(["label", "import", str(path), str(to_label)]) == 0
    ActiveLearningRun.open(path, scorer=scorer).resume()
    assert [r["label"] for r in rd.read_labeled().to_pylist()] == ["true", "false", "false", "true"]
    assert rd.read_state().phase == "done"


def test_a_moved_pool_is_named_on_resume_and_resume_set_points_the_run_at_it(tiny_model_dir, scorer, tmp_path, capsys):
    from pipeline.demo import demo_rows

    first = _write(tmp_path / "a.jsonl", list(demo_rows(40, 0, "pool")))
    path = tmp_path / "run"

    def stop(k, phase, when):
        if (k, phase, when) == (1, "scoring", "before"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ActiveLearningRun(loop_config(tiny_model_dir, data={"path": str(first)}), path, scorer=scorer, hook=stop).run()
    moved = first.rename(tmp_path / "b.jsonl")
    config_before = (path / "config.yaml").read_bytes()
    assert deft(["resume", str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.path: data file not found" in err and f"deft resume {path} --set data.path=..." in err
    assert deft(["resume", str(path), "--set", "al.rounds=3"]) == 2
    assert "--set al.rounds: cannot change in a run that has started" in capsys.readouterr().err
    assert (path / "config.yaml").read_bytes() == config_before  # refused resumes change nothing
    other = _write(tmp_path / "c.jsonl", [dict(r, question=r["question"] + " (v2)") for r in demo_rows(40, 0, "pool")])
    assert deft(["resume", str(path), "--set", f"data.path={other}"]) == 2  # a pool without the labelled rows
    assert f"data.path: {other} lacks 6 of this run's labelled examples" in capsys.readouterr().err
    assert (path / "config.yaml").read_bytes() == config_before
    assert deft(["resume", str(path), "--set", f"data.path={moved}"]) == 0
    assert RunDir(path).read_config().data.path == str(moved) and RunDir(path).read_state().phase == "done"
    assert RunDir(path).read_labeled().num_rows == 11


def test_allow_partial_continues_with_what_is_labelled(tiny_model_dir, scorer, tmp_path):
    cfg = loop_config(tiny_model_dir, al={"oracle": "human", "rounds": 1, "initial_size": 4})
    path = tmp_path / "run"
    with pytest.raises(NeedsLabels):
        ActiveLearningRun(cfg, path, scorer=scorer).run()
    rd = RunDir(path)
    partial = _write(tmp_path / "p.jsonl", _fill(rd.to_label_file(0), ["true", "", "false", ""]))
    assert deft(["label", "import", str(path), str(partial), "--allow-partial"]) == 0
    ActiveLearningRun.open(path, scorer=scorer).resume()
    assert rd.read_labeled().num_rows == 2 and rd.read_state().phase == "done"


def test_verbalizer_loss_runs_the_loop_and_trains_a_different_adapter(tiny_model_dir, scorer, reference, tmp_path):
    """train.loss verbalizer end to end: the same rows, a different objective, so different adapters; its
    round-0 loss is a 2-way cross-entropy (well under the LM loss over the whole vocabulary at the start)."""
    import hashlib

    path = tmp_path / "run"
    metrics = ActiveLearningRun(loop_config(tiny_model_dir, train={"loss": "verbalizer"}), path, scorer=scorer).run()
    assert [m["labels"] for m in metrics] == [6, 11] and all(0.0 <= m["accuracy"] <= 1.0 for m in metrics)
    assert outcome(path)[1][0] == reference[1][1][0]  # the cold start does not depend on the loss
    digest = lambda p: hashlib.sha256((RunDir(p).adapter_dir(0) / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert digest(path) != digest(reference[0])
    first = json.loads((RunDir(path).round_dir(0) / "train_metrics.json").read_text())["epoch_loss"][0]
    lm_first = json.loads((RunDir(reference[0]).round_dir(0) / "train_metrics.json").read_text())["epoch_loss"][0]
    assert first < 3.0 < lm_first, (first, lm_first)


@pytest.mark.parametrize("full", [True, False])
def test_candidate_sampling_scores_a_seeded_subset_each_round(tiny_model_dir, scorer, tmp_path, full):
    """al.candidates: each round scores N unlabelled rows drawn afresh (seeded) and selects among them; STAR's
    u_base covers the whole pool (once) or only the rows drawn as candidates."""
    cfg = loop_config(tiny_model_dir, al={"candidates": 12, "base_on_full_pool": full})
    path = tmp_path / "run"
    ActiveLearningRun(cfg, path, scorer=scorer).run()
    rd = RunDir(path)
    drawn = {}
    for k in (0, 1):
        scored = read_parquet(rd.scores_file(k)).column("example_id").to_pylist()
        selected = read_parquet(rd.selected_file(k)).column("example_id").to_pylist()
        assert len(scored) == 12 and set(selected) <= set(scored)
        drawn[k] = set(scored)
    assert drawn[0] != drawn[1] and not (set(read_parquet(rd.selected_file(0)).column("example_id").to_pylist()) & drawn[1])
    base_rows = read_parquet(rd.base_uncertainty_file).num_rows
    assert base_rows == (40 if full else len(drawn[0] | drawn[1]))
    again = tmp_path / "again"  # the draw is seeded: the same candidates again
    ActiveLearningRun(cfg, again, scorer=scorer).run()
    assert [read_parquet(RunDir(again).scores_file(k)).column("example_id").to_pylist() for k in (0, 1)] == \
        [read_parquet(rd.scores_file(k)).column("example_id").to_pylist() for k in (0, 1)]


def test_a_templated_task_shares_its_instruction_in_the_real_loop(tiny_model_dir, scorer, tmp_path):
    """A custom task whose template puts a long instruction before every question: the loop's scorers run
    that prefix once per block, and the base scores they cache are the unshared forward's."""
    import torch

    from actors.scorer import Scorer, shared_prefix
    from pipeline.data import pool_from_config
    from pipeline.tasks import get_task

    from conftest import scorer_kwargs
    from test_scorer import INSTRUCTION

    task = {"name": "custom", "input_fields": ["question"], "answer_field": "answer", "labels": ["true", "false"],
            "label_words": [" true", " false"], "prompt_template": INSTRUCTION + "{question}\nthe correct answer is"}
    cfg = loop_config(tiny_model_dir, task=task)
    path = tmp_path / "run"
    metrics = ActiveLearningRun(cfg, path, scorer=scorer).run()
    assert [m["labels"] for m in metrics] == [6, 11]
    base = read_parquet(RunDir(path).base_uncertainty_file).sort_by("example_id")
    assert base.num_rows == 40
    pool = pool_from_config(cfg.data, get_task(cfg.task), cfg.seed, require_label=True).for_scoring()
    prompts = dict(zip(pool.column("example_id").to_pylist(), pool.column("prompt").to_pylist()))
    batch = {"example_id": base.column("example_id").to_pylist()}
    batch["prompt"] = [prompts[e] for e in batch["example_id"]]
    plain = Scorer(**scorer_kwargs(cfg, tiny_model_dir))
    assert shared_prefix(plain.tokenizer(batch["prompt"][:4]).input_ids) > 0  # the instruction is long enough
    plain.prefix_sharing = False
    unshared = plain.score(batch, "base")
    assert torch.allclose(torch.tensor(base.column("entropy").to_pylist()), torch.tensor(unshared["entropy"]), atol=1e-5)
