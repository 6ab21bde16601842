"""The benchmarks that can run at test size do, and their last line is the JSON they promise."""
import json

import pytest
import torch
import yaml

from pipeline.config import to_dict
from tests.conftest import tiny_config

pytestmark = pytest.mark.integration


def test_pool_scale_measures_a_round_of_the_driver(ray_local, tmp_path, capsys):
    from benchmarks.pool_scale import main

    result = main(["--rows", "300", "--labeled", "20", "--select", "5", "--batch-size", "16", "--work-dir", str(tmp_path)])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"benchmark": "pool_scale"')
    assert [c["call"] for c in result["calls"]] == ["base", "lora"] and [c["rows"] for c in result["calls"]] == [300, 280]
    assert result["driver_peak_rss_mb"] >= result["driver_rss_before_load_mb"] > 0
    assert result["driver_cpu_s_per_million"] > 0 and result["rows_per_s"] > 0


@pytest.mark.parametrize("shape,vocab,params", [
    ("smollm2-135m", 49152, 134_515_008),  # the embedded SmolLM2-135M's own count
    ("llama2-7b", 32000, 6_738_415_616),  # LLaMA-2-7B's published count
])
def test_random_model_shapes_have_the_real_models_parameter_counts(shape, vocab, params):
    """benchmarks.random_model stands in for models that cannot be downloaded here, so its shapes must be
    the real ones: counted on the meta device, nothing allocated."""
    from transformers import LlamaForCausalLM

    from benchmarks.random_model import llama_config

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(shape, vocab))
    assert sum(p.numel() for p in model.parameters()) == params


def test_round_memory_runs_the_loops_phases_on_a_large_pool():
    """The load and both rounds' phases (opening the pool, scoring, selecting, labelling) run through the
    loop's own code (a stand-in scorer, fresh processes). At 2M rows a round's peak over the process before
    the pool opens stays under 200 bytes a row (~156 measured, some 90 MB of it fixed; ~350 before the top
    b was picked from the score column alone) and the load's under 120 (~75 measured; ~175 when duplicates
    were found by Arrow's count_distinct) (README)."""
    from benchmarks.round_memory import main

    result = main(["--rows", "2000000"])
    assert [r["round"] for r in result["rounds"]] == [0, 1] and all(r["rows"] == 2_000_000 for r in result["rounds"])
    assert result["load"]["rows"] == 2_000_000
    assert 0 < result["peak_growth_bytes_per_row"] < 200, result
    assert 0 < result["load_peak_growth_bytes_per_row"] < 120, result


def test_scoring_benchmark_reports_the_plain_and_the_templated_pool(ray_local, tiny_model_dir, capsys):
    """Every path runs on both pools, and on the templated one deft runs the shared instruction once a block."""
    from conftest import SHARED

    from benchmarks.scoring import main

    result = main(["--model", tiny_model_dir, "--data", str(SHARED / "boolq" / "train.jsonl"), "--rows", "32",
                   "--reference-rows", "4", "--actors", "1", "--dtype", "float32", "--train-steps", "2",
                   "--batch-size", "8", "--shots", "1"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == json.dumps(result)
    plain, templated = result["pools"]["plain"], result["pools"]["templated"]
    assert set(plain["examples_per_s_by_path"]) == {"deft", "limit", "reference", "baal"}
    assert set(templated["examples_per_s_by_path"]) == {"deft", "limit", "baal"}
    assert result["ratio_vs_limit"] == plain["ratio_vs_limit"] > 0 and templated["ratio_vs_baal"] > 0
    assert plain["mean_shared_prefix_tokens"] == 0  # BoolQ prompts start with the question
    assert templated["mean_shared_prefix_tokens"] > 0.5 * templated["mean_prompt_tokens"]


def test_fresh_start_trains_each_step_count_on_the_same_rows_and_reports_one_class_runs(tiny_model_dir, tmp_path, capsys):
    from benchmarks import fresh_start

    cfg = tiny_config(tiny_model_dir, data={"path": "demo", "test_path": "demo", "demo_size": 40},
                      al={"eval_limit": 12}, train={"backend": "local", "batch_size": 8})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    out = fresh_start.main([str(path), "--labels", "8", "--steps", "1,3", "--seeds", "0,1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert [(r["seed"], r["asked_steps"]) for r in out["runs"]] == [(0, 1), (0, 3), (1, 1), (1, 3)]
    for r in out["runs"]:  # 8 rows at batch 8: one step an epoch, so min_steps sets the epochs
        assert r["steps"] == r["asked_steps"] == len(r["epoch_loss"])
        assert r["one_class"] == (r["top_share"] >= 0.95) and 0 < r["top_share"] <= 1 and 0 <= r["accuracy"] <= 1
    assert out["by_steps"].keys() == {"1", "3"} and all(s["runs"] == 2 for s in out["by_steps"].values())
    assert out["runs"][0]["label_majority_share"] == out["runs"][1]["label_majority_share"]  # the same rows per seed
    assert out["runs"][0]["epoch_loss"][0] == out["runs"][1]["epoch_loss"][0]  # ... and the same start


def test_distillation_trains_a_teacher_then_a_fresh_student_per_step_count(tiny_model_dir, tmp_path, capsys):
    from benchmarks import distillation

    cfg = tiny_config(tiny_model_dir, data={"path": "demo", "test_path": "demo", "demo_size": 40},
                      al={"eval_limit": 12}, train={"backend": "local", "batch_size": 4})
    path = tmp_path / "tiny.yaml"
    data = to_dict(cfg)
    del data["self_training"]  # explicit keys would override the preset the benchmark asks for
    path.write_text(yaml.safe_dump(data))
    out = distillation.main([str(path), "--teacher-labels", "4,8", "--student-steps", "1,3",
                             "--set", "self_training.batch_size=4", "--set", "self_training.warmup_fraction=0.5"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    (run,) = out["runs"]
    assert run["pseudo_rows"] == 40 - 8  # every pool row the teacher's gold rows left
    assert [s["steps"] for s in run["students"]] == [1, 3]
    assert run["students"][0]["lr"] == 1e-3  # preset small, since no --set named a preset
    for s in run["students"]:
        assert 0 <= s["student"]["accuracy"] <= 1 and 0 <= s["fine_tuned"]["accuracy"] <= 1
        assert s["student_loss"] >= 0 and s["gold_loss"] >= 0
    # 3 steps with a 0.5 warm-up take 1 meta re-weighted step; the two students are different adapters
    assert run["students"][0]["student_loss"] != run["students"][1]["student_loss"]


def test_replay_round_gives_the_rounds_own_step_losses_and_changes_only_training(ray_local, tiny_model_dir, tmp_path, capsys):
    """Replaying round 1 with the run's own settings repeats its training step for step (warm start from
    round 0's adapter, the same rows and seed); another lr changes the steps; a non-training key is refused."""
    from benchmarks import replay_round
    from pipeline.config import ConfigError
    from pipeline.loop import ActiveLearningRun

    cfg = tiny_config(tiny_model_dir, al={"strategy": "random", "initial_size": 6, "batch_size": 5, "rounds": 2,
                                          "evaluate_base": False},
                      train={"backend": "local", "batch_size": 4, "min_steps": 3})
    run = ActiveLearningRun(cfg, tmp_path / "run")
    try:
        run.run()
    finally:
        run.close()
    own = json.loads((tmp_path / "run" / "rounds" / "1" / "train_metrics.json").read_text())
    assert len(own["step_loss"]) == len(own["step_lr"]) == len(own["step_grad_norm"]) == own["steps"] == 3
    out = replay_round.main([str(tmp_path / "run"), "--round", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert out["warm_start"] and out["rows"] == 11 and out["step_loss"] == own["step_loss"]
    other = replay_round.main([str(tmp_path / "run"), "--round", "1", "--set", "train.lr=0.05"])
    assert other["step_loss"][0] == own["step_loss"][0] and other["step_loss"][1:] != own["step_loss"][1:]
    with pytest.raises(ConfigError, match="only train.* and lora.dropout can change"):
        replay_round.main([str(tmp_path / "run"), "--round", "1", "--set", "al.batch_size=2"])


def test_recipe_point_names_keep_decimal_values():
    from benchmarks.recipe import grid_points, point_name

    points = grid_points(["train.warmup_ratio=0.1,0.3", "lora.r=8"])
    assert [point_name(p) for p in points] == ["warmup_ratio-0.1_r-8", "warmup_ratio-0.3_r-8"]
    assert point_name(["train.lr=3e-4"]) == "lr-3e-4" and point_name([]) == "defaults"


def test_recipe_runs_a_comparison_per_grid_point_and_counts_runs_ending_on_one_answer(
        ray_local, tiny_model_dir, tmp_path, capsys):
    from benchmarks import recipe
    from pipeline.report import one_answer
    from pipeline.run_dir import RunDir

    cfg = tiny_config(tiny_model_dir, data={"path": "demo", "test_path": "demo", "demo_size": 40},
                      al={"initial_size": 6, "batch_size": 5, "rounds": 2, "eval_limit": 12},
                      train={"backend": "local", "batch_size": 4, "epochs": 1, "min_steps": 2})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    out = recipe.main([str(path), "--grid", "train.lr=1e-3,3e-2", "--strategies", "random", "--seeds", "0,1",
                       "--out", str(tmp_path / "sweep"), "--check-labels", "6"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert set(out["points"]) == {"lr-1e-3", "lr-3e-2"}
    for name, point in out["points"].items():
        m = point["strategies"]["random"]
        runs = {seed: RunDir(tmp_path / "sweep" / name / f"random-seed{seed}").read_metrics() for seed in (0, 1)}
        finals = [runs[seed][-1]["accuracy"] for seed in (0, 1)]
        assert m["final"]["mean"] == pytest.approx(sum(finals) / 2) and m["at_check"]["labels"] == 6
        assert m["final_one_answer"] == [f"random-seed{seed}" for seed in (0, 1) if one_answer(runs[seed][-1])]
    # A run whose last adapter answered one class is counted; one that did not, not.
    rd = RunDir(tmp_path / "sweep" / "lr-1e-3" / "random-seed1")
    rd.put_metrics({**rd.read_metrics()[-1], "answers": {"true": 12}})
    rd0 = RunDir(tmp_path / "sweep" / "lr-1e-3" / "random-seed0")
    rd0.put_metrics({**rd0.read_metrics()[-1], "answers": {"true": 7, "false": 5}})
    assert recipe.final_one_answer(tmp_path / "sweep" / "lr-1e-3", "random", [0, 1]) == ["random-seed1"]
