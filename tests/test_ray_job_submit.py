"""`ray job submit --working-dir . -- deft run CONFIG` against a real local cluster started with
`ray start --head`, with Ray 2.60's token auth on (a token made for this test, not ~/.ray's)."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.run_dir import RunDir

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_cluster(temp_dir: str) -> None:
    """Stop only this test's cluster: `ray stop` would also stop the test session's own Ray."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                procs += [p] + p.children(recursive=True)
        except psutil.Error:
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def test_ray_job_submit_runs_a_tiny_loop(tiny_model_dir, tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="deftray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dashboard = _free_port(), _free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": uuid.uuid4().hex,
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("RAY_ADDRESS", None)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": tiny_model_dir, "dtype": "float32", "max_length": 256},
        "lora": {"r": 4, "alpha": 8},
        "task": {"name": "demo"},
        "data": {"path": "demo", "test_path": "demo", "demo_size": 30},
        "scoring": {"batch_size": 4, "num_actors": 2},
        "al": {"initial_size": 6, "rounds": 1, "eval_limit": 10, "ece_bins": 10},
        "train": {"epochs": 1, "batch_size": 4, "backend": "ray"},
    }))
    run_dir = tmp_path / "run"
    ray = str(BIN / "ray")
    # Every service on a free port: the test session's own Ray already holds the defaults (e.g. 52365).
    ports = {flag: _free_port() for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                             "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port")}
    subprocess.run([ray, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--num-cpus=2",
                    "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                    *[f"{flag}={port}" for flag, port in ports.items()]],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        for _ in range(30):  # the dashboard agent comes up a few seconds after `ray start` returns
            # Without --no-wait the CLI tails the job's logs until it ends, exits 1 if it FAILED and
            # prints "Job '...' succeeded" once it reached SUCCEEDED.
            submit = subprocess.run(
                [ray, "job", "submit", f"--address={address}", "--working-dir", str(REPO), "--",
                 "deft", "run", str(config), "--run-dir", str(run_dir)],
                env=env, capture_output=True, text=True, timeout=900, cwd=REPO,
            )
            said = submit.stdout + submit.stderr
            if submit.returncode == 0 or "No available agent" not in said:
                break
            time.sleep(2)
        assert submit.returncode == 0, said[-3000:]
        assert "succeeded" in said and "report:" in said, said[-3000:]
        rd = RunDir(run_dir)
        assert rd.read_state().phase == "done"
        assert rd.read_labeled().num_rows == 6
        assert (rd.adapter_dir(0) / "adapter_model.safetensors").is_file()
        assert len(rd.read_metrics()) == 1 and rd.report_file.is_file()
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
