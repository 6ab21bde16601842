"""Every shipped config loads and validates, and the data paths it names exist from the repo root."""
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.strategies import measure_column
from pipeline.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.stem for p in CONFIGS} >= {"quickstart", "boolq", "obqa", "gsm8k"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads(path):
    cfg = load_config(path)
    task = get_task(cfg.task)
    measure_column(task.kind, cfg.al.measure)  # the measure exists for this task kind
    for data in (cfg.data.path, cfg.data.test_path):
        if data and data != "demo" and not data.startswith("hf:"):
            assert (REPO / data).resolve().is_file(), data
