"""Where Ray is: an embedded local Ray by default, or a real cluster via --address / RAY_ADDRESS.

Inside `ray job submit`, RAY_ADDRESS is set by Ray, so the same entry point joins the job's cluster.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

log = logging.getLogger(__name__)

# What every process of a run needs, cluster or laptop: quiet tokenizers.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}
# Ray Train settings measured on 2 CPU cores: its controller polls worker health every 2 s by default,
# which adds 3-4 s to the end of every fit (0.5 s: under 1 s); the preemption watcher is one more
# process started per fit. The driver's environment is what Ray Train passes to its controller.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
_PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DEFT_CACHE", "TORCH_EXTENSIONS_DIR", "HF_HOME")


def runtime_env() -> dict:
    env = dict(WORKER_ENV)
    env.update({k: os.environ[k] for k in _PASSED_ENV if k in os.environ})
    return {"env_vars": env}


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None, temp_dir: Optional[str] = None):
    """Start or join Ray once per process and return the `ray` module.

    address None and no RAY_ADDRESS: an embedded local Ray with nothing to set up (no dashboard, no
    usage stats). Otherwise join that cluster; num_cpus/temp_dir only apply to the embedded case.
    """
    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=True)
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = {"_temp_dir": os.path.abspath(temp_dir)} if temp_dir else {}
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        runtime_env=runtime_env(),
        log_to_driver=True,
        configure_logging=False,
        **kwargs,
    )
    log.info("started embedded Ray: %s", ray.cluster_resources())
    return ray


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
