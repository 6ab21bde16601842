"""LiST through the real loop (tiny model, local Ray scorers, 2 rounds x 2 sessions): what the run dir
holds, that pseudo-labels never count or carry gold, and that a kill inside a session resumes to the
same adapter, bit for bit."""
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.io import read_parquet
from pipeline.loop import ActiveLearningRun, round_summary
from pipeline.run_dir import RunDir
from pipeline.scoring import PoolScorer
from pipeline.self_training import RoundSelfTraining, teacher_information

from conftest import tiny_config

pytestmark = pytest.mark.integration


def config(model_dir, **st):
    return tiny_config(
        model_dir,
        al={"strategy": "star", "initial_size": 6, "batch_size": 5, "rounds": 2, "evaluate_base": False, "eval_limit": 10},
        train={"epochs": 2, "lr": 3e-3, "batch_size": 4, "backend": "local"},
        # the guards off: the tiny random teacher labels every row alike and unsure, and these tests are
        # about the distillation itself (the guards have their own test below)
        self_training={"enabled": True, "sessions": 2, "steps": 4, "warmup_fraction": 0.5, "batch_size": 4,
                       "meta_batch": 2, "lr": 1e-3, "meta_lr": 1e-2, "skip_one_class": False,
                       "min_teacher_information": None, **st},
    )


@pytest.fixture(scope="module")
def scorer(ray_local, tiny_model_dir):
    s = PoolScorer(config(tiny_model_dir), tiny_model_dir)
    yield s
    s.shutdown()


def digest(path):
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, scorer, tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "run"
    seen = []  # what every scoring call reads: the columns of the file the scorers are pointed at
    original = scorer.score

    def spy(inputs, mode, **kw):
        seen.append((mode, pq.read_schema(inputs.path).names))
        return original(inputs, mode, **kw)

    scorer.score = spy
    try:
        metrics = ActiveLearningRun(config(tiny_model_dir), path, scorer=scorer).run()
    finally:
        scorer.score = original
    return path, metrics, seen


def test_self_training_run_dir_and_accounting(reference):
    path, metrics, seen = reference
    rd = RunDir(path)
    assert [m["labels"] for m in metrics] == [6, 11]  # gold only: pseudo rows are not labels
    assert set(rd.read_labeled().column("source").to_pylist()) == {"oracle"}
    assert all(cols == ["example_id", "prompt", "n_chars"] for _, cols in seen)  # label-free teacher
    assert sum(1 for mode, _ in seen if mode == "eval") >= 4  # 2 rounds x 2 sessions of pseudo-labelling
    labeled = rd.read_labeled()
    for k, m in enumerate(metrics):
        gold_ids = set(labeled.filter(pc.less_equal(labeled.column("round_added"), k)).column("example_id").to_pylist())
        selected = set(read_parquet(rd.selected_file(k)).column("example_id").to_pylist())
        assert selected <= gold_ids
        for s in range(2):
            d = rd.round_dir(k) / "self_training" / str(s)
            pseudo = read_parquet(d / "pseudo.parquet")
            assert pseudo.column_names == ["example_id", "source", "probs", "confidence", "pseudo_label", "weight"]
            ids = pseudo.column("example_id").to_pylist()
            assert not set(ids) & gold_ids  # this round's oracle rows and every earlier label are excluded
            assert len(ids) == 40 - len(gold_ids)  # the rest of the pool
            assert set(pseudo.column("source").to_pylist()) == {"pseudo"}
            probs = np.array(pseudo.column("probs").to_pylist())
            assert probs.sum(1) == pytest.approx(np.ones(len(ids)))  # soft labels, not one-hot gold
            assert [("true", "false")[i] for i in probs.argmax(1)] == pseudo.column("pseudo_label").to_pylist()
            weights = [w for w in pseudo.column("weight").to_pylist() if w is not None]
            assert weights and all(w >= 0 for w in weights)  # meta re-weighted steps ran (2 of 4 steps)
            for sub in ("student", "adapter"):
                assert (d / sub / "adapter_config.json").is_file()
        last = rd.round_dir(k) / "self_training" / "1" / "adapter"
        assert digest(rd.adapter_dir(k)) == digest(last)  # the round's adapter is the last student
        assert digest(rd.adapter_dir(k)) != digest(rd.round_dir(k) / "teacher")
        line = m["self_training"]
        assert line["sessions"] == 2 and line["pseudo_rows"] == [40 - len(gold_ids)] * 2
        assert all(np.isfinite(line["student_loss"])) and all(np.isfinite(line["gold_loss"]))


class Killed(BaseException):
    pass


@pytest.mark.parametrize("step", ["_train_student", "_gold_fine_tune"])
def test_kill_inside_a_session_resumes_to_the_same_adapter(tiny_model_dir, scorer, reference, tmp_path, monkeypatch, step):
    """Killed in round 1, session 1 (after its pseudo-labels; after its student), then resumed: every
    adapter ends bit for bit as in the uninterrupted run."""
    ref_path, ref_metrics, _ = reference
    original = getattr(RoundSelfTraining, step)

    def kill_once(self, s, *args):
        if self.k == 1 and s == 1:
            monkeypatch.setattr(RoundSelfTraining, step, original)
            raise Killed()
        return original(self, s, *args)

    monkeypatch.setattr(RoundSelfTraining, step, kill_once)
    path = tmp_path / "run"
    with pytest.raises(Killed):
        ActiveLearningRun(config(tiny_model_dir), path, scorer=scorer).run()
    d = RunDir(path).round_dir(1) / "self_training" / "1"
    assert (d / "pseudo.parquet").is_file() and not (d / "adapter").exists()
    assert (d / "student").exists() == (step == "_gold_fine_tune")
    metrics = ActiveLearningRun.open(path, scorer=scorer).resume()
    losses = lambda ms: [(m["train_loss"], m["self_training"]["student_loss"], m["self_training"]["gold_loss"]) for m in ms]
    assert losses(metrics) == losses(ref_metrics)
    for k in range(2):
        for s in range(2):
            sub = f"self_training/{s}"
            assert digest(RunDir(path).round_dir(k) / sub / "adapter") == digest(RunDir(ref_path).round_dir(k) / sub / "adapter")
        assert digest(RunDir(path).adapter_dir(k)) == digest(RunDir(ref_path).adapter_dir(k))


def test_min_confidence_filters_the_pseudo_labels(tiny_model_dir, scorer, reference, tmp_path):
    """self_training.min_confidence (beyond LiST, off by default) keeps only rows the teacher is sure of."""
    ref_pseudo = read_parquet(RunDir(reference[0]).round_dir(0) / "self_training" / "0" / "pseudo.parquet")
    threshold = float(np.median(ref_pseudo.column("confidence").to_numpy()))  # the same teacher: about half pass
    cfg = config(tiny_model_dir, sessions=1, min_confidence=threshold)
    cfg.al.rounds = 1
    ActiveLearningRun(cfg, tmp_path / "run", scorer=scorer).run()
    pseudo = read_parquet(RunDir(tmp_path / "run").round_dir(0) / "self_training" / "0" / "pseudo.parquet")
    kept = [c for c in ref_pseudo.column("confidence").to_pylist() if c >= threshold]
    assert 0 < pseudo.num_rows == len(kept) < ref_pseudo.num_rows
    assert min(pseudo.column("confidence").to_pylist()) >= threshold


def _uninformed(info: str, confidence: float, threshold: str = "5.00%") -> str:
    return (f"the teacher's pseudo-labels carry {info} of ln 2, the most a label can tell about its row "
            f"(self_training.min_teacher_information is {threshold}): its soft labels are nearly the same for every "
            f"row (mean confidence {confidence:.2f})")


@pytest.mark.parametrize("classes, sure, skip_one_class, min_information, skipped", [
    (["true"], 0.9, True, 0.05, "all 34 pseudo-labels are 'true': the teacher has only the class prior to teach"),
    (["true"], 0.9, False, 0.05, _uninformed("0.00%", 0.9)),  # the same distribution for every row carries nothing
    (["true"], 0.9, False, None, None),
    (["true", "false"], 0.9, True, 0.05, None),
    (["true", "false"], 0.51, True, 0.05, _uninformed("0.03%", 0.51)),
    (["true", "false"], 0.51, True, None, None),
    (["true", "false"], 0.6, True, 0.05, _uninformed("2.90%", 0.6)),  # the threshold decides: 2.9% of ln 2
    (["true", "false"], 0.6, True, 0.01, None),
])
def test_a_teacher_with_only_the_prior_to_teach_is_not_distilled_unless_asked(
        tiny_model_dir, scorer, tmp_path, monkeypatch, classes, sure, skip_one_class, min_information, skipped):
    """Beyond LiST, on by default: a teacher that labels every row alike (skip_one_class), or whose soft
    labels are nearly the same for every row (min_teacher_information), has only the class prior to teach.
    Its session is skipped, the teacher stays the round's adapter, and the later sessions (which would
    see the same teacher) do not run. With the guards off, or a teacher that tells rows apart, the
    student is trained."""
    original = RoundSelfTraining._pseudo_label

    def teacher(self, teacher_state):  # the real teacher's rows, each made a vote of `sure` for its class
        t = original(self, teacher_state)
        n = t.num_rows
        labels = [classes[i % len(classes)] for i in range(n)]
        probs = [[sure, 1 - sure] if label == "true" else [1 - sure, sure] for label in labels]
        return t.set_column(2, "probs", pa.array(probs, t.schema.field("probs").type)) \
                .set_column(3, "confidence", pa.array([sure] * n, t.schema.field("confidence").type)) \
                .set_column(4, "pseudo_label", pa.array(labels))

    monkeypatch.setattr(RoundSelfTraining, "_pseudo_label", teacher)
    cfg = config(tiny_model_dir, skip_one_class=skip_one_class, min_teacher_information=min_information)
    cfg.al.rounds = 1
    metrics = ActiveLearningRun(cfg, tmp_path / "run", scorer=scorer).run()
    rd = RunDir(tmp_path / "run")
    d = rd.round_dir(0) / "self_training"
    line = metrics[0]["self_training"]
    session = json.loads((d / "0" / "metrics.json").read_text())
    assert session["teacher_information"] == pytest.approx(teacher_information(
        [[sure, 1 - sure] if i % len(classes) == 0 else [1 - sure, sure] for i in range(session["pseudo_rows"])]))
    assert line["teacher_information"][0] == session["teacher_information"]
    if skipped:
        assert digest(rd.adapter_dir(0)) == digest(rd.round_dir(0) / "teacher")
        assert not (d / "0" / "student").exists() and not (d / "1").exists()
        assert session["skipped"] == skipped
        assert (line["sessions"], line["skipped_sessions"], line["gold_loss"]) == (1, 1, [None])
        assert "self-training 1 session, 1 skipped in " in round_summary(rd, 0)  # the console says so
    else:
        assert "skipped" not in session
        assert digest(rd.adapter_dir(0)) != digest(rd.round_dir(0) / "teacher")
        assert (d / "1" / "student" / "adapter_config.json").is_file()
        assert (line["sessions"], line["skipped_sessions"]) == (2, 0)
        assert "self-training 2 sessions in " in round_summary(rd, 0)
