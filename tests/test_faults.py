"""Fault injection with real SIGKILLs: a scoring actor mid-round, a Ray Train worker mid-fit, the driver
mid-phase. Each run ends (by itself, or after `deft resume`) with the labelled set of an uninterrupted
run, and leaves no Ray process behind. Also: the embedded Ray listens on 127.0.0.1 only."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from actors.model import adapter_state
from actors.scorer import Scorer
from pipeline.config import to_dict
from pipeline.data import load_pool
from pipeline.run_dir import RunDir
from pipeline.scoring import PoolScorer
from pipeline.tasks import demo

from conftest import scorer_kwargs, tiny_config, trained_like_adapter

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def test_a_scorer_killed_mid_round_is_revived_and_the_scores_are_bit_identical(ray_local, tiny_model_dir):
    cfg = tiny_config(tiny_model_dir, data={"demo_size": 120})
    table = load_pool("demo", demo(), demo_size=120).for_scoring()
    ps = PoolScorer(cfg, tiny_model_dir)
    try:
        ps.set_adapter(trained_like_adapter(adapter_state(Scorer(**scorer_kwargs(cfg, tiny_model_dir)).model)))
        reference = ps.score(table, "lora", progress=False)
        pids = [i["pid"] for i in ps.info()]
        killed = []

        def kill_the_other(actor: int, rows: int) -> None:  # the first shard back: kill the actor still busy
            if not killed:
                victim = 1 - actor
                os.kill(pids[victim], signal.SIGKILL)
                killed.append(victim)

        again = ps.score(table, "lora", progress=False, on_part=kill_the_other)
        assert ps.deaths >= 1  # the kill landed mid-round: at least one shard was scored again
        assert again.equals(reference)  # every row exactly once (checked inside), the same bits
        infos = ps.info()
        assert infos[killed[0]]["pid"] != pids[killed[0]] and infos[killed[0]]["adapter_version"] >= 1
        assert ps.score(table, "lora", progress=False).equals(reference)  # the revived actor holds the adapter
    finally:
        ps.shutdown()


# ---- whole runs in their own process: deft run / kill -9 / deft resume -------------------------------------

def _config(tmp_path: Path, model_dir: str, name: str, **sections) -> Path:
    cfg = tiny_config(model_dir, data={"path": "demo", "test_path": "demo", "demo_size": 40},
                      al={"initial_size": 6, "batch_size": 5, "rounds": 2, "eval_limit": 12, **sections.pop("al", {})},
                      train={"epochs": 1, "lr": 3e-3, "batch_size": 4, "backend": "local", **sections.pop("train", {})},
                      cluster={"num_cpus": 2, "temp_dir": tempfile.mkdtemp(prefix=f"deft-{name}-")}, **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def _deft(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_ADDRESS": ""}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def _labelled(run: Path) -> list[tuple]:
    return sorted((r["example_id"], r["label"], r["round_added"]) for r in RunDir(run).read_labeled().to_pylist())


def _phase(run: Path) -> tuple:
    try:
        s = json.loads((run / "state.json").read_text())
        return s["round"], s["phase"]
    except (OSError, ValueError):
        return None


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[str]:
    """Processes of `procs` still alive after `timeout` s."""
    deadline = time.monotonic() + timeout
    alive = procs
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.5)
    return [f"{p.pid} {p.name()}" for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    """The labelled set of an uninterrupted run. Random selection does not depend on the adapters, so the
    runs below (one trains in-process, one with Ray Train) must both end with it. (Kills and resumes of a
    STAR run, whose selection does depend on them, are tests/test_loop.py's, at every phase.)"""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = _config(tmp, tiny_model_dir, "random", al={"strategy": "random"})
    code, log = _finish(_deft("run", str(cfg), "--run-dir", str(tmp / "random")))
    assert code == 0, log
    return _labelled(tmp / "random")


def _kill_when(proc: subprocess.Popen, run: Path, target: tuple, find_victim) -> list[psutil.Process]:
    """Wait until the run reaches phase `target`, then SIGKILL what `find_victim(driver)` returns. Returns the
    driver's process tree as it was just before the kill (to check that nothing of it outlives the run)."""
    deadline = time.monotonic() + 240
    while _phase(run) != target:
        assert proc.poll() is None, _finish(proc)[1]
        assert time.monotonic() < deadline, f"never reached {target}: {_phase(run)}"
        time.sleep(0.05)
    driver = psutil.Process(proc.pid)
    victim = find_victim(driver)
    tree = [driver] + driver.children(recursive=True)
    victim.send_signal(signal.SIGKILL)
    return tree


def test_the_driver_killed_mid_phase_resumes_to_the_same_labels(tmp_path, tiny_model_dir, uninterrupted):
    cfg, run = _config(tmp_path, tiny_model_dir, "random", al={"strategy": "random"}), tmp_path / "run"
    proc = _deft("run", str(cfg), "--run-dir", str(run))
    tree = _kill_when(proc, run, (1, "training"), lambda driver: driver)  # mid-phase: training adapter 1
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    left = _wait_gone(tree, 90)
    assert not left, f"Ray processes outlived the killed driver: {left}"
    code, log = _finish(_deft("resume", str(run)))  # the flock died with the driver: not a stale lock
    assert code == 0, log
    assert _labelled(run) == uninterrupted


def test_a_train_worker_killed_mid_fit_fails_cleanly_and_resume_reruns_it(tmp_path, tiny_model_dir, uninterrupted):
    cfg = _config(tmp_path, tiny_model_dir, "random-ray", al={"strategy": "random"}, train={"backend": "ray"})
    run = tmp_path / "run"
    proc = _deft("run", str(cfg), "--run-dir", str(run))

    def train_worker(driver: psutil.Process) -> psutil.Process:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for p in driver.children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(p.cmdline()):
                        return p
                except psutil.Error:
                    continue
            time.sleep(0.05)
        raise AssertionError("no Ray Train worker appeared")

    victims = []

    def note(driver):
        victims.append(train_worker(driver))
        return victims[0]

    tree = _kill_when(proc, run, (1, "training"), note)
    code, log = _finish(proc)
    assert not victims[0].is_running() or victims[0].status() == psutil.STATUS_ZOMBIE
    if code != 0:  # the fit failed: one line that says where the run stopped, then resume trains the round again
        lines = [line for line in log.splitlines() if line.startswith("deft: error:")]
        assert code == 1 and len(lines) == 1 and "Traceback" not in log, log
        assert f"deft resume {run}" in log and _phase(run) == (1, "training")
        code, log = _finish(_deft("resume", str(run)))
    # else: Ray Train replaced the worker group itself (a worker that dies while the group starts is retried)
    assert code == 0, log
    assert _labelled(run) == uninterrupted
    assert not _wait_gone(tree, 90)


def test_the_embedded_ray_listens_on_loopback_only(ray_local):
    import ray

    @ray.remote(num_cpus=0)
    def pid() -> int:
        return os.getpid()

    ray.get(pid.remote())  # at least one worker process exists
    ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert len(listening) >= 5  # GCS, raylet, object manager, workers, agents: the check saw them
    wide = [f"{c.laddr.ip}:{c.laddr.port} (pid {c.pid})" for c in listening
            if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not wide, f"listening beyond loopback: {wide}"
