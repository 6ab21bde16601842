"""What a person sees: a run's console holds deft's own lines (a progress bar per phase, a line per round,
where the logs are) and none of Ray's or the libraries' chatter; -v brings the workers' output back."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from pipeline.config import to_dict
from pipeline.run_dir import RunDir

from conftest import tiny_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
NOISE = re.compile(r"PlacementGroupCleaner|FutureWarning|DeprecationWarning|TrainingReport\(|execution finished|"
                   r"Loading weights|Setting accelerator|\(RayTrainWorker|\(Scorer|Traceback")


def _deft(*args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_ADDRESS": "", **env_vars}
    env.pop("DEFT_VERBOSE", None)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def _config(tmp_path: Path, model_dir: str, rounds: int = 1, **train) -> Path:
    cfg = tiny_config(model_dir, data={"path": "demo", "test_path": "demo", "demo_size": 30},
                      al={"initial_size": 6, "batch_size": 5, "rounds": rounds, "eval_limit": 12},
                      train={"epochs": 1, "batch_size": 4, **train},
                      cluster={"num_cpus": 2, "temp_dir": tempfile.mkdtemp(prefix="deft-console-")})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def test_a_ray_train_run_prints_deft_lines_only(tmp_path, tiny_model_dir):
    """Also the whole loop under Ray Train + DeepSpeed: two rounds, the second warm-started from the first,
    with nothing JIT-built (cluster.deepspeed.skip_unused_shm_op)."""
    run, extensions = tmp_path / "run", tmp_path / "torch_extensions"
    done = _deft("run", str(_config(tmp_path, tiny_model_dir, rounds=2, backend="ray")), "--run-dir", str(run),
                 TORCH_EXTENSIONS_DIR=str(extensions))
    console = (done.stdout + done.stderr).replace("\r", "\n")
    assert done.returncode == 0, console
    noise = [line for line in console.splitlines() if NOISE.search(line)]
    assert not noise, "\n".join(noise[:20])
    # (the tiny random model may answer one class, and the line then says so)
    assert re.search(r"^round 0: 6 labels, accuracy \d\.\d{3}, ECE \d\.\d{3}(, the same answer \('\w+'\) for every test row)? "
                     r"\(scoring \d+s, training \d+s, evaluating \d+s\)$", console, re.M), console
    # Ray Train's steps reach the driver as its own bar (the workers' output does not): steps and loss
    assert re.search(r"^training: .*\b(\d+)/\1 .*loss=\d+\.\d{4}", console, re.M), console
    assert len(re.findall(r"^logs: .*driver\.log; Ray's worker logs: ", console, re.M)) == 1, console
    log = (run / "logs" / "driver.log").read_text()
    assert "round 0: training" in log  # the driver's own log lines went to the file, not the console
    rd = RunDir(run)
    assert rd.read_state().phase == "done" and [m["labels"] for m in rd.read_metrics()] == [6, 11]
    for k in (0, 1):
        assert (rd.adapter_dir(k) / "adapter_model.safetensors").is_file()
        assert json.loads((rd.round_dir(k) / "train_metrics.json").read_text())["world_size"] == 2  # train.num_workers
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(extensions.rglob("*"))


def test_verbose_brings_the_workers_output_back(tmp_path, tiny_model_dir):
    # (the quiet side, no "(Scorer pid=" line, is NOISE in the test above)
    loud = _deft("-v", "score", str(_config(tmp_path, tiny_model_dir)), "--top", "2")
    assert loud.returncode == 0, loud.stderr
    assert "(Scorer pid=" in loud.stdout + loud.stderr  # Ray forwards the scoring actors' output again
    assert "INFO" in loud.stderr  # and every log line
