"""Driver side of training: one Ray Train `TorchTrainer.fit()` per round, and the adapter it produces.

Ray is imported inside the functions so that `pipeline` stays importable without it.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pyarrow as pa
import torch

from pipeline.config import Config, to_dict

log = logging.getLogger(__name__)
ADAPTER_FILE = "adapter_model.safetensors"
TRAIN_COLUMNS = ["example_id", "prompt", "target"]


@dataclass
class TrainResult:
    adapter_dir: Path  # a PEFT save_pretrained dir: PeftModel.from_pretrained(base, adapter_dir) loads it
    state: dict[str, torch.Tensor]  # the same weights, ready to broadcast to the scorers
    metrics: dict  # epoch_loss, examples_per_s, setup_s, train_s, fit_s, overhead_s, ...


def read_adapter_state(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / ADAPTER_FILE))


def install_dir(src: str, dst: Path) -> None:
    """Copy a finished checkpoint dir into place atomically (temp dir + rename)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def loop_config(cfg: Config, model_path: str, threads: Optional[int], add_eos: bool = False, init_adapter=None):
    from actors.trainer import LoopConfig

    from pipeline.tasks import get_task

    loss = cfg.train.loss
    return LoopConfig(
        model_path=model_path, model=to_dict(cfg.model), lora=to_dict(cfg.lora), train=to_dict(cfg.train),
        add_eos=add_eos, seed=cfg.seed, threads=threads, init_adapter=init_adapter, loss=loss,
        label_words=list(get_task(cfg.task).label_words) if loss == "verbalizer" else None,
    )


def _check_labeled(labeled: pa.Table) -> None:
    missing = set(TRAIN_COLUMNS) - set(labeled.column_names)
    if missing:
        raise ValueError(f"the labelled table needs columns {TRAIN_COLUMNS}; missing {sorted(missing)}")
    if labeled.num_rows == 0:
        raise ValueError("nothing to train on: the labelled set is empty")


def train_adapter_in_process(
    cfg: Config, model_path: str, labeled: pa.Table, out_dir: str | os.PathLike, add_eos: bool,
    init_state: Optional[dict[str, torch.Tensor]] = None, threads: Optional[int] = None,
) -> TrainResult:
    """The same recipe in the driver process (train.backend=local): no Ray Train start-up cost."""
    from actors.trainer import train_in_process

    _check_labeled(labeled)
    loop = loop_config(cfg, model_path, threads, add_eos, init_state)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        metrics = train_in_process(loop, labeled.select(TRAIN_COLUMNS).to_pylist(), tmp)
        install_dir(tmp, Path(out_dir))
    metrics["fit_s"] = time.perf_counter() - t0
    metrics["overhead_s"] = metrics["fit_s"] - metrics["train_s"]
    return TrainResult(Path(out_dir), read_adapter_state(out_dir), metrics)


def train_adapter(
    cfg: Config,
    model_path: str,
    labeled: pa.Table,
    out_dir: str | os.PathLike,
    plan,
    add_eos: bool,
    init_state: Optional[dict[str, torch.Tensor]] = None,
    storage_path: Optional[str] = None,
    name: str = "deft-train",
) -> TrainResult:
    """Fine-tune a fresh LoRA (or `init_state`, for warm starts) on `labeled` with Ray Train + DeepSpeed."""
    import ray

    _check_labeled(labeled)
    loop = loop_config(cfg, model_path, plan.threads_per_train_worker, add_eos,
                       ray.put(init_state) if init_state is not None else None)
    return fit_with_ray_train(cfg, loop, {"train": labeled.select(TRAIN_COLUMNS)}, out_dir, plan, storage_path, name)


def fit_with_ray_train(cfg: Config, loop, datasets: dict[str, pa.Table], out_dir: str | os.PathLike, plan,
                       storage_path: Optional[str], name: str) -> TrainResult:
    """One `TorchTrainer.fit()` of `actors.trainer.train_loop_per_worker`; its checkpoint becomes out_dir."""
    import ray
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from actors.trainer import train_loop_per_worker

    storage = Path(storage_path or cfg.cluster.storage_path or Path(out_dir).parent / "ray_train").resolve()
    # Rank 0 puts (step, total, loss) here after every optimizer step; the driver turns them into its bar.
    # num_cpus=0: the queue must never take a CPU that the train workers are waiting for.
    progress = Queue(maxsize=1000, actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**vars(loop), "progress": progress},
        scaling_config=ScalingConfig(
            num_workers=plan.train_workers, use_gpu=plan.use_gpu, resources_per_worker=plan.train_resources
        ),
        datasets={k: ray.data.from_arrow(v) for k, v in datasets.items()},
        dataset_config=DataConfig(datasets_to_split=[]),  # every rank slices the whole set itself
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    t0 = time.perf_counter()
    result = _fit_with_progress(trainer, progress, "student" if loop.self_training else "training")
    fit_s = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without an adapter checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as ckpt:
        install_dir(ckpt, Path(out_dir))
    metrics = dict(result.metrics or {})
    metrics["fit_s"] = fit_s
    metrics["overhead_s"] = fit_s - metrics.get("train_s", 0.0)
    return TrainResult(Path(out_dir), read_adapter_state(out_dir), metrics)


def _fit_with_progress(trainer, queue, desc: str):
    """`trainer.fit()` in a thread while the driver shows rank 0's steps as one bar: Ray Train's own
    output stays in the worker logs. fit()'s error, if any, is raised here."""
    import threading
    from queue import Empty

    from tqdm.auto import tqdm

    box: dict = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the driver's thread below
            box["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    with tqdm(desc=desc, unit="step", leave=False) as bar:
        def show(items):
            for step, total, loss in items:
                bar.total, bar.n = total, step
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if items:
                bar.refresh()

        while thread.is_alive():
            try:
                show([queue.get(timeout=0.5)] + queue.get_nowait_batch(queue.qsize()))
            except Empty:
                continue
        show(queue.get_nowait_batch(queue.qsize()))
    queue.shutdown(force=True)
    if "error" in box:
        raise box["error"]
    return box["result"]
