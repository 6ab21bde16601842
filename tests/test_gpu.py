"""GPU paths: bf16 scoring on CUDA, and a Ray Train + DeepSpeed fit with NCCL and bf16. Skipped without CUDA."""
import pytest
import torch

from actors.model import adapter_state
from actors.scorer import Scorer
from cluster.plan import plan_resources
from pipeline.data import load_pool
from pipeline.tasks import demo

from conftest import scorer_kwargs, tiny_config, trained_like_adapter

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_scorer_runs_bf16_on_cuda_with_real_mc_dropout(tiny_model_dir):
    cfg = tiny_config(tiny_model_dir, model={"dtype": "auto"})
    scorer = Scorer(**scorer_kwargs(cfg, tiny_model_dir))
    assert scorer.info()["device"].startswith("cuda") and scorer.info()["dtype"] == "torch.bfloat16"
    scorer.set_adapter(trained_like_adapter(adapter_state(scorer.model)))
    table = load_pool("demo", demo(), demo_size=16).for_scoring()
    batch = {k: table.column(k).to_pylist() for k in table.column_names}
    assert min(scorer.score(batch, "lora")["bald"]) > 0
    assert scorer.score(batch, "base")["entropy"] == scorer.score(batch, "base")["entropy"]


def test_ray_train_fit_uses_nccl_and_bf16(ray_local, tiny_model_dir, tmp_path):
    from pipeline.training import train_adapter

    cfg = tiny_config(tiny_model_dir, train={"epochs": 2, "lr": 3e-3, "batch_size": 8, "precision": "auto"})
    plan = plan_resources(ray_local.cluster_resources(), 1, cfg.cluster.scorer_cpus, train_workers=1)
    assert plan.use_gpu
    labeled = load_pool("demo", demo(), demo_size=16, seed=3).table
    result = train_adapter(cfg, tiny_model_dir, labeled, tmp_path / "adapter", plan, add_eos=False)
    assert result.metrics["epoch_loss"][-1] < result.metrics["epoch_loss"][0]
