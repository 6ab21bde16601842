"""Shared fixtures: a tiny random Llama with an in-process BPE tokenizer (benchmarks.tiny_model), configs
for it, local Ray. Nothing here touches the network."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
if "DEFT_POOL_CACHE" not in os.environ:  # the pools the tests load go to a scratch dir, not ~/.cache/deft
    import atexit
    import shutil
    import tempfile

    os.environ["DEFT_POOL_CACHE"] = tempfile.mkdtemp(prefix="deft-test-pools-")
    atexit.register(shutil.rmtree, os.environ["DEFT_POOL_CACHE"], True)

from pathlib import Path

import pytest

from benchmarks.tiny_model import build_tokenizer, save_tiny_model, trained_like_adapter  # noqa: F401 (re-exported)
from pipeline.config import Config, from_dict, to_dict

# The project takes the shared datasets by path (they are never committed): ../shared/datasets.
SHARED = Path(os.environ.get("DEFT_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def tiny_config(model_dir: str, **sections) -> Config:
    """A Config for the tiny model; `sections` override per section, e.g. scoring={"mc_passes": 5}."""
    base = {
        "model": {"name": model_dir, "dtype": "float32", "max_length": 256},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.3},
        "task": {"name": "demo", "max_new_tokens": 8},
        "data": {"path": "demo", "demo_size": 40},
        "scoring": {"mc_passes": 3, "batch_size": 4, "num_actors": 2},
        "cluster": {"num_cpus": 2},
        "train": {"min_steps": 0},  # the tests choose their epochs; warm_start keeps its default (on)
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return from_dict(Config, base)


def scorer_kwargs(cfg: Config, model_dir: str) -> dict:
    return dict(
        model_path=model_dir,
        model=to_dict(cfg.model),
        lora=to_dict(cfg.lora),
        task=to_dict(cfg.task),
        scoring=to_dict(cfg.scoring),
        seed=cfg.seed,
    )


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One embedded Ray for the whole session, with its files kept inside pytest's tmp dir."""
    from cluster.runtime import connect, shutdown

    temp = tmp_path_factory.mktemp("ray")
    ray = connect(num_cpus=2, temp_dir=str(temp))
    yield ray
    shutdown()


def pytest_runtest_logreport(report):
    """Print a failure's report the moment it happens, not only in the summary at the end: a CI run cut off
    by its time limit then still shows why its tests failed."""
    if report.failed:
        import sys

        text = report.longreprtext
        sys.stderr.write(f"\n=== FAILED {report.nodeid} ({report.when}, {report.duration:.0f} s) ===\n{text[-4000:]}\n")
        sys.stderr.flush()
