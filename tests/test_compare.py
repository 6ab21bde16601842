"""`deft compare` on the tiny model: run dirs per (strategy, seed), the summary's numbers recomputed from
those run dirs, label saving by hand, and a second call that resumes instead of starting over."""
import json

import pytest
import yaml

from pipeline.cli import main as deft
from cluster.runtime import machine
from pipeline.compare import labels_to_reach, plot_title, print_table, render_markdown, summarize, _label_saving
from pipeline.config import to_dict
from pipeline.loop import ActiveLearningRun, round_summary
from pipeline.report import aulc, curve_points, render_report
from pipeline.run_dir import RunDir

from conftest import tiny_config

pytestmark = pytest.mark.integration


def test_parallel_lanes_need_ray_train(tiny_model_dir, tmp_path, capsys):
    path, _ = config_file(tiny_model_dir, tmp_path / "tiny.yaml")  # train.backend: local
    argv = ["compare", str(path), "--strategies", "random,star", "--seeds", "0", "--out", str(tmp_path / "c"), "--parallel", "2"]
    assert deft(argv) == 2
    assert "--parallel > 1 needs train.backend=ray" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_labels_to_reach_interpolates_between_rounds():
    curve = [(0, 0.5), (10, 0.6), (20, 0.8), (30, 0.9)]
    assert labels_to_reach(curve, 0.7) == pytest.approx(15.0)
    assert labels_to_reach(curve, 0.5) == 0.0
    assert labels_to_reach(curve, 0.95) is None


def test_label_saving_by_hand():
    def curve(*accs):
        return [{"labels": x, "accuracy": {"mean": a, "sd": 0.0}} for x, a in zip((0, 10, 20, 30), accs)]

    out = _label_saving({"random": curve(0.5, 0.6, 0.7, 0.8), "star": curve(0.5, 0.7, 0.8, 0.85)})
    assert out["target_accuracy"] == 0.8
    assert out["label_saving"]["random"]["labels"] == pytest.approx(30.0)
    assert out["label_saving"]["star"]["labels"] == pytest.approx(20.0)
    assert out["label_saving"]["star"]["pct_of_random"] == pytest.approx(100 * 20 / 30)
    assert "label_saving_note" not in out and "label_saving_caveat" not in out
    assert out["label_saving"]["random"] == {"labels": 30.0, "pct_of_random": 100.0, "saving_pct": 0.0}

    # AG News on 2 cores: random peaked at 32-48 labels and fell back, so its own curve first reaches its
    # final accuracy between 16 and 32 labels, and a strategy that gets there later shows a negative saving
    peaked = _label_saving({"random": curve(0.68, 0.81, 0.85, 0.83), "star": curve(0.68, 0.81, 0.82, 0.86)})
    assert peaked["label_saving"]["random"]["labels"] == pytest.approx(15.0)
    assert peaked["label_saving"]["star"]["saving_pct"] == pytest.approx(100.0 - 100 * 22.5 / 15)  # 0.82 -> 0.86 over 20-30 labels
    assert "first reaches its final accuracy 0.830 at 15.0 labels, before its last point (30 labels)" in peaked["label_saving_caveat"]
    summary = {"strategies": ["random", "star"], "seeds": [0], "aulc": {}, "curves": {}, **peaked}
    lines = []
    print_table({**summary, "curves": {"random": [], "star": []}, "aulc": {"random": {}, "star": {}}}, lines.append)
    assert any(line.startswith("  note: random's mean curve first reaches") for line in lines)
    assert "-0%" not in "\n".join(lines)

    # BoolQ on the small model: training only lowered accuracy, so random's target is met at 0 labels
    flat = _label_saving({"random": curve(0.70, 0.69, 0.64, 0.61), "star": curve(0.70, 0.69, 0.66, 0.60)})
    assert flat["label_saving"]["star"] == {"labels": None, "pct_of_random": None, "saving_pct": None}
    assert "does not beat the base model's (0.700)" in flat["label_saving_note"]


def config_file(model_dir, path):
    cfg = tiny_config(model_dir, data={"path": "demo", "test_path": "demo", "demo_size": 40},
                      al={"initial_size": 6, "batch_size": 5, "rounds": 2, "eval_limit": 12, "ece_bins": 10},
                      train={"epochs": 2, "lr": 3e-3, "batch_size": 4, "backend": "local"})
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path, cfg


class Killed(BaseException):
    pass


def test_compare_runs_every_strategy_and_seed_and_resumes(tiny_model_dir, ray_local, tmp_path, capsys):
    path, cfg = config_file(tiny_model_dir, tmp_path / "tiny.yaml")
    out = tmp_path / "cmp"
    # One run is already half done (killed in round 1's training): compare must resume it, not restart it.
    from pipeline.compare import run_config

    def kill(k, phase, when):
        if (k, phase, when) == (1, "training", "before"):
            raise Killed()

    with pytest.raises(Killed):
        ActiveLearningRun(run_config(cfg, "star", 1), out / "star-seed1", hook=kill).run()
    first_round = RunDir(out / "star-seed1").read_labeled().to_pylist()

    argv = ["compare", str(path), "--strategies", "random,bald,star", "--seeds", "0,1", "--out", str(out)]
    assert deft(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert "[compare] star-seed1: resuming" in lines
    assert set(summary["aulc"]) == set(summary["curves"]) == set(summary["label_saving"]) == {"random", "bald", "star"}
    for s in ("random", "bald", "star"):
        runs = [RunDir(out / f"{s}-seed{seed}") for seed in (0, 1)]
        assert all(r.read_state().phase == "done" and r.read_config().al.strategy == s for r in runs)
        assert [r.read_config().seed for r in runs] == [0, 1]
        areas = [aulc(curve_points(r)) for r in runs]
        assert summary["aulc"][s]["mean"] == pytest.approx(sum(areas) / 2)
        assert [p["labels"] for p in summary["curves"][s]] == [0, 6, 11]
        final = [r.read_metrics()[-1]["accuracy"] for r in runs]
        assert summary["curves"][s][-1]["accuracy"]["mean"] == pytest.approx(sum(final) / 2)
    assert summary["target_accuracy"] == summary["curves"]["random"][-1]["accuracy"]["mean"]
    assert len(first_round) == 11  # killed after round 1's labels, before its training
    assert RunDir(out / "star-seed1").read_labeled().to_pylist() == first_round  # resumed: the same labels, none added
    # Runs differ by seed: the cold-start batches of seed 0 and seed 1 are not the same rows.
    labeled = [set(RunDir(out / f"random-seed{seed}").read_labeled().column("example_id").to_pylist()) for seed in (0, 1)]
    assert labeled[0] != labeled[1]
    for name in ("compare.md", "compare.png", "compare.json", "base_scores.parquet"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert all(summary["phase_s"][s]["evaluating_s"] > 0 and summary["phase_s"][s]["training_s"] > 0 for s in summary["phase_s"])
    md = (out / "compare.md").read_text()
    assert "## Label saving" in md and "| random |" in md and "± " in md
    # Every evaluated adapter's answers are counted; the ones that gave one answer for every test row are listed.
    for s in ("random", "bald", "star"):
        expected = []
        for seed in (0, 1):
            for m in RunDir(out / f"{s}-seed{seed}").read_metrics():
                assert sum(m["answers"].values()) == m["n"] == 12 and set(m["answers"]) <= {"true", "false"}
                if len(m["answers"]) == 1:
                    answer = next(iter(m["answers"]))
                    expected.append({"run": f"{s}-seed{seed}", "labels": m["labels"], "answer": answer})
        assert summary["one_answer"][s] == expected

    # Again: nothing is re-run, and the summary is the same.
    assert deft(argv) == 0
    again = capsys.readouterr().out.strip().splitlines()
    assert sum("already done" in l for l in again) == 6
    redo = json.loads(again[-1])
    assert {k: v for k, v in redo.items() if k != "wall_s"} == {k: v for k, v in summary.items() if k != "wall_s"}
    assert summarize(out, ["random", "bald", "star"], [0, 1])["aulc"] == summary["aulc"]

    # The machine every round ran on is named; a comparison computed on two machines says which ran where.
    names = [f"{s}-seed{seed}" for s in ("random", "bald", "star") for seed in (0, 1)]
    assert summary["machines"] == {machine(): names} and f"Computed on: {machine()}." in md
    elsewhere = RunDir(out / "bald-seed1")
    elsewhere.put_metrics({**elsewhere.read_metrics()[-1], "machine": "Intel Xeon, 2 cores"})
    two = summarize(out, ["random", "bald", "star"], [0, 1])
    assert two["machines"] == {machine(): names, "Intel Xeon, 2 cores": ["bald-seed1"]}
    assert render_markdown(two).splitlines()[2] == (
        f"Computed on more than one machine, and results can differ between machines: {machine()} "
        f"({', '.join(names)}); Intel Xeon, 2 cores (bald-seed1).")
    # An adapter that answered one class is named in compare.md and on the console, whatever its accuracy.
    for rd, answers in ((elsewhere, {"true": 12}), (RunDir(out / "bald-seed0"), {"true": 7, "false": 5})):
        rd.put_metrics({**rd.read_metrics()[-1], "answers": answers})
    one = summarize(out, ["random", "bald", "star"], [0, 1])
    assert {"run": "bald-seed1", "labels": 11, "answer": "true"} in one["one_answer"]["bald"]
    assert not any(p["run"] == "bald-seed0" and p["labels"] == 11 for p in one["one_answer"]["bald"])
    md = render_markdown(one)
    listed = md.split("## Adapters that answered one class")[1].split("## Wall time")[0]
    assert "bald-seed1 at " in listed and "11 labels ('true')" in listed
    printed = []
    print_table(one, printed.append)
    assert any(l.startswith("one answer for every test row: bald: ") and "bald-seed1" in l for l in printed)
    assert "the same answer ('true') for every test row" in round_summary(elsewhere, 1)
    assert "the same answer" not in round_summary(RunDir(out / "bald-seed0"), 1)
    assert "| true 12 |" in render_report(elsewhere)
    assert "| true 7, false 5 |" in render_report(RunDir(out / "bald-seed0"))  # most given first, as read back
    older = RunDir(out / "random-seed0")  # a round from before deft named the machine or counted answers
    older.put_metrics({k: v for k, v in older.read_metrics()[0].items() if k not in ("machine", "answers")})
    listed = summarize(out, ["random"], [0])["one_answer"]["random"]
    assert not any(p["labels"] == 6 for p in listed)
    assert "| 0 | 6 | " in render_report(older) and "the same answer" not in round_summary(older, 0)
    elsewhere.put_metrics({**elsewhere.read_metrics()[-1], "machine": machine()})
    assert render_markdown(summarize(out, ["random", "bald", "star"], [0, 1])).splitlines()[2] == (
        f"Computed on: {machine()}. Not recorded for some rounds (run before deft named the machine) of: random-seed0.")


def test_compare_refuses_a_run_of_another_config(tiny_model_dir, ray_local, tmp_path, capsys):
    path, cfg = config_file(tiny_model_dir, tmp_path / "tiny.yaml")
    out = tmp_path / "cmp"
    (out / "random-seed0").mkdir(parents=True)
    from pipeline.compare import run_config
    from pipeline.run_dir import RunDir as R

    other = run_config(cfg, "random", 0)
    other.train.lr = 0.5
    R(out / "random-seed0").write_config(other)
    assert deft(["compare", str(path), "--strategies", "random", "--seeds", "0", "--out", str(out)]) == 2
    assert "holds a run of another config" in capsys.readouterr().err


def test_quickstart_command_compares_random_and_star(tiny_model_dir, ray_local, tmp_path, capsys):
    """`deft quickstart` (the Makefile's command) end to end, on the tiny model instead of SmolLM2."""
    tiny = [f"model.name={tiny_model_dir}", "model.dtype=float32", "lora.r=4", "data.demo_size=40", "al.initial_size=6",
            "al.batch_size=5", "al.rounds=2", "al.eval_limit=12", "al.ece_bins=10", "train.min_steps=4",
            "scoring.batch_size=4", "cluster.num_cpus=2"]
    argv = ["quickstart", "--out", str(tmp_path / "qs")] + [x for kv in tiny for x in ("--set", kv)]
    assert deft(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["strategies"] == ["random", "star"] and summary["seeds"] == [0]
    assert any(l.startswith("label saving") for l in out) and any(l.strip().startswith("AULC") for l in out)
    for s in ("random", "star"):
        cfg = RunDir(tmp_path / "qs" / f"{s}-seed0").read_config()
        assert cfg.task.name == "demo" and cfg.train.backend == "local" and cfg.al.strategy == s


def test_compare_star_against_star_with_self_training(tiny_model_dir, ray_local, tmp_path, capsys):
    """NAME+st runs NAME with LiST on, a plain name with it off, whatever the config says; both get a curve."""
    path, cfg = config_file(tiny_model_dir, tmp_path / "tiny.yaml")
    data = yaml.safe_load(path.read_text())
    data["self_training"] = {**data["self_training"], "enabled": True, "sessions": 1, "steps": 2, "batch_size": 4,
                             "meta_batch": 2, "warmup_fraction": 0.5}
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "cmp"
    assert deft(["compare", str(path), "--strategies", "star,star+st", "--seeds", "0", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["strategies"] == ["star", "star+st"] and set(summary["aulc"]) == {"star", "star+st"}
    plain, st = RunDir(out / "star-seed0"), RunDir(out / "star+st-seed0")
    assert not plain.read_config().self_training.enabled and st.read_config().self_training.enabled
    assert st.read_config().al.strategy == "star"
    assert not (plain.round_dir(0) / "self_training").exists()
    assert (st.round_dir(1) / "self_training" / "0" / "adapter" / "adapter_model.safetensors").is_file()
    assert [m["labels"] for m in st.read_metrics()] == [m["labels"] for m in plain.read_metrics()] == [6, 11]
    assert "self_training" in st.read_metrics()[1] and "self_training" not in plain.read_metrics()[1]
    assert summary["phase_s"]["star+st"]["self_training_s"] > 0 == summary["phase_s"]["star"]["self_training_s"]
    assert "of which self-training" in (out / "compare.md").read_text()
    assert deft(["compare", str(path), "--strategies", "bogus+st", "--seeds", "0", "--out", str(tmp_path / "x")]) == 2
    assert "al.strategy should be one of" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_plot_names_its_machine():
    one = {"seeds": [0, 1, 2], "machines": {"AMD EPYC, 2 cores": ["random-seed0"], "not recorded": ["star-seed0"]}}
    assert plot_title(one) == "3 seed(s) · AMD EPYC, 2 cores"
    two = {"seeds": [0], "machines": {"AMD EPYC, 2 cores": ["random-seed0"], "Intel Xeon, 2 cores": ["star-seed0"]}}
    assert plot_title(two) == "1 seed(s) · 2 machines (compare.md)"
    assert plot_title({"seeds": [0], "machines": {"not recorded": ["random-seed0"]}}) == "1 seed(s) · machine not recorded"
