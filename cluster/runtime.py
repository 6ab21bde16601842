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
_PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DEFT_CACHE", "TORCH_EXTENSIONS_DIR",
               "HF_HOME", "DEFT_VERBOSE")


def verbose() -> bool:
    """`deft -v` (DEFT_VERBOSE=1): Ray workers' output comes to the console too, and every log line."""
    return os.environ.get("DEFT_VERBOSE") == "1"


class _Without(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_libraries() -> None:
    """Filter known-harmless library chatter at its source, in the driver and in every actor (each says
    why it is harmless). `deft -v` keeps all of it."""
    if verbose():
        return
    import warnings

    # PEFT 0.21 reads `is_gradient_checkpointing`, which transformers 5 renamed: a rename, nothing to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # Ray Data's DataContext warns about its own deprecated fields each time it is copied; deft sets none.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data\.context")
    # DeepSpeed says it fell back to the CPU accelerator, at import, on every machine without CUDA: that is
    # the CPU path deft chose (a GPU worker detects CUDA and never says it).
    logging.getLogger("DeepSpeed").addFilter(_Without("Setting accelerator to CPU"))
    # transformers 5 draws a "Loading weights" bar per model load: per scorer and per training round.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def runtime_env() -> dict:
    env = dict(WORKER_ENV)
    env.update({k: os.environ[k] for k in _PASSED_ENV if k in os.environ})
    return {"env_vars": env}


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None, temp_dir: Optional[str] = None):
    """Start or join Ray once per process and return the `ray` module.

    address None and no RAY_ADDRESS: an embedded local Ray with nothing to set up (no dashboard, no
    usage stats), reachable from this machine only (every port on 127.0.0.1). Otherwise join that cluster; num_cpus/temp_dir only apply to the embedded case.
    """
    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=verbose())
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    loopback_only(ray)
    kwargs = {"_temp_dir": os.path.abspath(temp_dir)} if temp_dir else {}
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        runtime_env=runtime_env(),
        # Workers' stdout/stderr stay in Ray's log files (logs_dir()) unless -v: forwarded, they bury deft's
        # own lines under Ray Train reports, Ray Data stats and library warnings. Errors still reach the
        # driver as exceptions, with their cause (pipeline.errors).
        log_to_driver=verbose(),
        configure_logging=False,
        **kwargs,
    )
    log.info("started embedded Ray: %s", ray.cluster_resources())
    return ray


def loopback_only(ray) -> None:
    """Make an embedded Ray listen on 127.0.0.1 only: GCS, raylet, object manager, workers, the dashboard
    agent and its metrics endpoint, the runtime-env agent. Ray 2.60 has no bind-address option; it binds
    everything to the node IP, which is 127.0.0.1 only when its "cluster mode" is off (on Linux it is on,
    so the node IP is the routable one and gRPC servers listen on [::]). Measured with psutil: with this,
    every listener of the instance is loopback. The flag is read at `import ray` (hence the constant)
    and by every Ray process the node starts (hence the environment)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False


def logs_dir() -> Optional[str]:
    """Where this node's Ray keeps worker logs, if Ray runs here."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_logs_dir_path() if ray.is_initialized() and node is not None else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine() -> str:
    """What a result was computed on: the driver's CPU and usable cores, and the GPU types of the Ray cluster
    it is connected to (types, not counts, which an autoscaler changes between rounds). Results can differ
    between machines (the same seed and code learned on an Intel Xeon and fell to the class prior on an AMD
    EPYC), so every round's metrics line names it."""
    import ray

    name = f"{cpu_name()}, {usable_cores()} cores"
    if not ray.is_initialized():
        return name
    try:
        resources = ray.cluster_resources()
    except Exception as e:  # a GCS hiccup must not fail a round that has been evaluated; the name is a note
        log.debug("cluster resources unavailable for the machine name: %s", e)
        return name
    kinds = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    if kinds:
        return f"{name}; GPUs: {', '.join(kinds)}"
    return f"{name}; GPUs" if resources.get("GPU") else name


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
