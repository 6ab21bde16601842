"""How big the cluster is, and how the long-lived scorers are laid out on it.

The rule, for the same code on 2 CPU cores or N GPUs:
  * GPUs present: one scorer per GPU (capped by scoring.num_actors). Each holds `1 - train_share` of its
    GPU, so a Ray Train worker can still be placed beside it; on one GPU, scoring and training time-share.
  * CPU only: `scoring.num_actors` scorers (default: one per 2 cores, at least 2 so the pool is really
    sharded), each with `cluster.scorer_cpus` logical CPUs (default 0.25, never all of them: Ray Train
    would wait forever for CPUs held by idle scorers) and an even share of the cores as torch threads.
  * Training: `train.num_workers` Ray Train workers (default: one per GPU, or 2 on CPU), sized to what
    the scorers leave free. Scorers stay alive and keep their weights during training; on CPU they
    are idle, on a GPU they share it (their 1 - train_share with the worker's train_share).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class ResourcePlan:
    num_scorers: int
    scorer_cpus: float
    scorer_gpus: float
    threads_per_scorer: int
    use_gpu: bool
    train_workers: int = 1
    train_resources: dict = field(default_factory=dict)  # per Ray Train worker
    threads_per_train_worker: int = 1

    def describe(self) -> str:
        where = f"{self.scorer_gpus:g} GPU" if self.use_gpu else f"{self.threads_per_scorer} thread(s)"
        return (
            f"{self.num_scorers} scorer(s), each {where}, {self.scorer_cpus:g} logical CPU; "
            f"{self.train_workers} train worker(s), each {self.train_resources}"
        )


def plan_resources(
    resources: dict,
    num_scorers: Optional[int] = None,
    scorer_cpus: float = 0.25,
    train_workers: Optional[int] = None,
    train_share: float = 0.5,
) -> ResourcePlan:
    """Lay out scorers and Ray Train workers on `resources` (as from `ray.cluster_resources()`)."""
    cpus = int(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0))
    if gpus > 0:
        n = min(num_scorers or gpus, gpus)
        w = train_workers or gpus
        if w > gpus:  # NCCL refuses two ranks on one GPU ("Duplicate GPU detected")
            raise ValueError(f"train.num_workers {w} is more than the cluster's {gpus} GPU(s); NCCL needs a GPU per worker")
        per_worker = {"GPU": train_share, "CPU": max(1.0, (cpus - n * scorer_cpus) // max(w, 1) or 1.0)}
        return ResourcePlan(n, scorer_cpus, 1.0 - train_share, max(1, cpus // n), True, w, per_worker, max(1, cpus // (n + w)))
    n = num_scorers or max(2, cpus // 2)
    w = train_workers or min(2, cpus)
    free = cpus - n * scorer_cpus
    if free <= 0:
        raise ValueError(f"{n} scorers x {scorer_cpus} CPU leave no CPU for training on {cpus} CPUs; lower cluster.scorer_cpus")
    return ResourcePlan(n, scorer_cpus, 0.0, max(1, cpus // n), False, w, {"CPU": free / w}, max(1, cpus // w))
