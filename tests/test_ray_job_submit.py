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
        "scoring": {"batch_size": 4, "bucket_size": 8, "num_actors": 2},
        "al": {"initial_size": 6, "rounds": 1, "eval_limit": 10, "ece_bins": 10},
        "train": {"epochs": 1, "batch_size": 4, "backend": "ray"},
    }))
    run_dir = tmp_path / "run"
    ray = str(BIN / "ray")
    subprocess.run([ray, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--num-cpus=2",
                    "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        for _ in range(30):  # the dashboard agent comes up a few seconds after `ray start` returns
            submit = subprocess.run(
                [ray, "job", "submit", f"--address={address}", "--no-wait", "--working-dir", str(REPO), "--",
                 "deft", "run", str(config), "--run-dir", str(run_dir)],
                env=env, capture_output=True, text=True, timeout=120, cwd=REPO,
            )
            if submit.returncode == 0 or "No available agent" not in submit.stdout + submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        job_id = next(w.strip("'") for line in submit.stdout.splitlines() for w in line.split() if w.strip("'").startswith("raysubmit_"))
        status, deadline = "", time.time() + 600
        while time.time() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
            time.sleep(5)
            out = subprocess.run([ray, "job", "status", f"--address={address}", job_id], env=env, capture_output=True, text=True)
            status = next((s for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING") if s in out.stdout), "")
        logs = subprocess.run([ray, "job", "logs", f"--address={address}", job_id], env=env, capture_output=True, text=True).stdout
        assert status == "SUCCEEDED", logs[-3000:]
        assert "report:" in logs
        rd = RunDir(run_dir)
        assert rd.read_state().phase == "done"
        assert rd.read_labeled().num_rows == 6
        assert (rd.adapter_dir(0) / "adapter_model.safetensors").is_file()
        assert len(rd.read_metrics()) == 1 and rd.report_file.is_file()
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
