"""Constraint-LoRA training through Ray Train + DeepSpeed on CPU, with a tiny random Llama.

Each fit has a fixed start-up cost (~30-40 s here), so the cases are few and each checks several things.
"""
import pyarrow as pa
import pytest
import torch

from actors.model import load_model
from cluster.plan import plan_resources
from pipeline.data import load_pool
from pipeline.scoring import PoolScorer
from pipeline.tasks import demo
from pipeline.training import ADAPTER_FILE, train_adapter

from conftest import tiny_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def labeled():
    return load_pool("demo", demo(), demo_size=24, seed=7).table


def _fit(cfg, model_dir, labeled, out, ray, workers, **kw):
    plan = plan_resources(ray.cluster_resources(), cfg.scoring.num_actors, cfg.cluster.scorer_cpus, train_workers=workers)
    return train_adapter(cfg, model_dir, labeled, out, plan, add_eos=False, **kw)


def test_training_lowers_loss_and_the_adapter_round_trips_and_broadcasts(ray_local, tiny_model_dir, labeled, tmp_path):
    from peft import PeftModel

    cfg = tiny_config(tiny_model_dir, train={"epochs": 6, "lr": 1e-2, "batch_size": 8})
    scorer = PoolScorer(cfg, tiny_model_dir)  # long-lived scorers stay up while Ray Train runs beside them
    try:
        table = labeled.select(["example_id", "prompt"])
        base_before = scorer.score(table, "base").column("entropy").to_pylist()
        lora_before = scorer.score(table, "lora").column("entropy").to_pylist()

        result = _fit(cfg, tiny_model_dir, labeled, tmp_path / "adapter", ray_local, workers=1)
        losses = result.metrics["epoch_loss"]
        # Falls overall and never climbs back by more than noise (0.05 nats) from one epoch to the next.
        assert len(losses) == 6 and all(b < a + 0.05 for a, b in zip(losses, losses[1:])), losses
        assert losses[0] - losses[-1] > 0.5, losses  # nats; the first epoch starts near ln(vocab)
        assert result.metrics["world_size"] == 1 and result.metrics["examples"] == 24
        steps = result.metrics["step_loss"]  # 3 steps an epoch; their mean is the epoch's loss
        assert [sum(steps[3 * e: 3 * e + 3]) / 3 for e in range(6)] == pytest.approx(losses, abs=1e-9)

        # A plain PEFT load of the saved dir gives exactly the weights that were broadcast.
        peft = PeftModel.from_pretrained(load_model(tiny_model_dir, cfg.model, device=torch.device("cpu")), str(result.adapter_dir))
        saved = {k: v for k, v in peft.state_dict().items() if "lora_" in k}
        assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B moved off zero
        for key, value in result.state.items():
            match = [v for k, v in saved.items() if k.replace(".default", "") == key]
            assert len(match) == 1 and torch.equal(match[0], value), key

        scorer.set_adapter(result.state)
        base_after = scorer.score(table, "base").column("entropy").to_pylist()
        lora_after = scorer.score(table, "lora").column("entropy").to_pylist()
        assert base_after == base_before
        assert lora_after != pytest.approx(lora_before, abs=1e-6)
        infos = scorer.info()
        assert [i["model_loads"] for i in infos] == [1] * len(infos)  # the base model was never reloaded
        assert [i["adapter_version"] for i in infos] == [1] * len(infos)
    finally:
        scorer.shutdown()


@pytest.mark.parametrize("stage", [2, 3])
def test_two_workers_produce_one_adapter(ray_local, tiny_model_dir, labeled, tmp_path, stage):
    if 0 < int(ray_local.cluster_resources().get("GPU", 0)) < 2:
        pytest.skip("two NCCL workers need two GPUs (a one-GPU plan refuses them: test_plan_refuses_more_workers_than_gpus)")
    cfg = tiny_config(tiny_model_dir, train={"epochs": 1, "lr": 1e-3, "batch_size": 8, "zero_stage": stage})
    result = _fit(cfg, tiny_model_dir, labeled, tmp_path / "adapter", ray_local, workers=2)
    assert result.metrics["world_size"] == 2
    steps = result.metrics["step_loss"]  # averaged over both ranks: their mean is the epoch's loss
    assert len(steps) == result.metrics["steps"] == 3
    assert sum(steps) / 3 == pytest.approx(result.metrics["epoch_loss"][0], abs=1e-9)
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == ["README.md", "adapter_config.json", ADAPTER_FILE]
    assert any(v.abs().sum() > 0 for k, v in result.state.items() if "lora_B" in k)  # gathered, not empty shards
    assert all(v.numel() > 0 for v in result.state.values())


def test_warm_start_continues_from_the_given_adapter(ray_local, tiny_model_dir, labeled, tmp_path):
    from actors.model import adapter_state, attach_lora

    # fp32 on a GPU too: DeepSpeed's bf16 mode hands back bf16-rounded weights (0.25 + x moves by ~1e-3)
    cfg = tiny_config(tiny_model_dir, train={"epochs": 1, "lr": 1e-9, "batch_size": 8, "weight_decay_b": 0.0,
                                             "precision": "fp32"})
    fresh = adapter_state(attach_lora(load_model(tiny_model_dir, cfg.model), cfg.lora))  # a fit's keys, B = 0
    init = {k: v + 0.25 if "lora_B" in k else v for k, v in fresh.items()}
    warm = _fit(cfg, tiny_model_dir, labeled, tmp_path / "b", ray_local, workers=1, init_state=init)
    assert set(warm.state) == set(init)
    for k in init:  # with lr ~ 0 and no decay, a warm start ends where it began (fp32 master weights on a GPU)
        assert torch.allclose(warm.state[k].float(), init[k].float(), atol=1e-5), k


def test_a_lists_student_trains_in_ray_train_as_in_process(ray_local, tiny_model_dir, labeled, tmp_path):
    """The LiST student through Ray Train + DeepSpeed (1 worker) takes the same steps as in-process: same
    per-step losses, through the warm-up and the meta re-weighted steps, and writes its meta-weights."""
    import json

    from actors.self_training import WEIGHTS_FILE, train_student_in_process
    from pipeline.self_training import student_loop_config
    from pipeline.training import fit_with_ray_train

    # fp32 on a GPU too: DeepSpeed's bf16 would differ from the in-process fp32 loop by more than rounding
    cfg = tiny_config(tiny_model_dir, train={"precision": "fp32"}, self_training={"enabled": True, "steps": 4, "warmup_fraction": 0.5, "batch_size": 4,
                                                       "meta_batch": 2, "lr": 1e-3, "meta_lr": 1e-2})
    rows = labeled.select(["example_id", "prompt"]).to_pylist()
    pseudo = pa.Table.from_pylist([{**r, "probs": [0.3, 0.7] if i % 2 else [0.8, 0.2]} for i, r in enumerate(rows[:12])])
    gold = labeled.select(["example_id", "prompt", "target"]).slice(12)
    plan = plan_resources(ray_local.cluster_resources(), cfg.scoring.num_actors, cfg.cluster.scorer_cpus, train_workers=1)
    loop = student_loop_config(cfg, tiny_model_dir, plan.threads_per_train_worker, seed=5, label_words=[" true", " false"])
    ray_result = fit_with_ray_train(cfg, loop, {"train": pseudo, "gold": gold}, tmp_path / "ray", plan, str(tmp_path / "rt"), "student")
    local = train_student_in_process(student_loop_config(cfg, tiny_model_dir, None, seed=5, label_words=[" true", " false"]),
                                     pseudo.to_pylist(), gold.to_pylist(), str(tmp_path / "local"))
    assert ray_result.metrics["steps"] == 4 and ray_result.metrics["warmup_steps"] == 2
    assert ray_result.metrics["loss_by_step"] == pytest.approx(local["loss_by_step"], rel=1e-4)
    weights = json.loads((tmp_path / "ray" / WEIGHTS_FILE).read_text())
    assert set(weights) == set(pseudo.column("example_id").to_pylist())
    assert any(w is not None for w in weights.values()) and all(w is None or w >= 0 for w in weights.values())
    assert any(v.abs().sum() > 0 for k, v in ray_result.state.items() if "lora_B" in k)
