"""Validate, then create: everything a run needs that can be checked before its directory exists.

    checked = preflight(cfg, task, need_labels=True)   # ConfigError / DataError naming the key or file

The config is already typed and validated (pipeline.config). This adds what needs files or a cluster:
the pool and the test split (read once, kept), the model directory and its weight format, the task's
label words against the tokenizer, and the resource plan against the cluster. None of it writes anything.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.config import Config, ConfigError, ModelConfig
from pipeline.data import DataError, Pool, eval_split_from_config, pool_from_config
from pipeline.tasks import Task, VerbalizerTask

log = logging.getLogger(__name__)
# The generated demo data is the same for every run seed, like a file: a run's seed varies what is
# selected and how the adapter trains, not what there is to learn or what it is tested on.
DATA_SEED = 0
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


@dataclass
class Checked:
    pool: Pool
    test: Optional[Pool]
    model_path: str


def stay_offline(cfg: Config) -> None:
    """deft contacts no model or dataset hub unless the config allows it: the offline switches of
    huggingface_hub, transformers and datasets are set here (and reach Ray workers through the runtime env)."""
    if not (cfg.model.allow_download or cfg.data.allow_download):
        for key in _OFFLINE_ENV:
            os.environ.setdefault(key, "1")


def _hub_id(name: str) -> bool:
    """Whether model.name reads as a Hugging Face id ("gpt2", "org/name") rather than a path: a path starts
    with / . or ~, has more than one /, or starts with a directory that exists here."""
    parts = name.split("/")
    return (not name.startswith(("/", ".", "~")) and len(parts) <= 2 and all(parts)
            and not (len(parts) == 2 and Path(parts[0]).is_dir()))


def check_model_dir(path: Path) -> None:
    """A Hugging Face model directory deft can load: config.json, safetensors weights, a tokenizer."""
    where = f"model.name: {path}"
    if not any(path.iterdir()):
        raise ConfigError(f"{where} is an empty directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{where} has no config.json: not a Hugging Face model directory")
    if not list(path.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickles:
            raise ConfigError(
                f"{where} holds only pickle weights ({', '.join(pickles[:3])}); deft loads safetensors only, since "
                "loading a pickle can run code. Re-save it with save_pretrained(..., safe_serialization=True)")
        raise ConfigError(f"{where} has no *.safetensors weights")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ConfigError(f"{where} has no tokenizer (tokenizer.json or tokenizer_config.json)")


def check_model(cfg: ModelConfig) -> str:
    """model.name resolved to a loadable local directory (or, with model.allow_download, a hub id)."""
    from actors.model import EMBEDDED_MODELS, in_hf_cache, resolve_model_path

    name = os.path.expanduser(cfg.name)
    path = Path(name)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"model.name: {name} is a file; it should be a model directory or a Hugging Face id")
    if path.is_dir():
        check_model_dir(path)
    elif not _hub_id(name):
        raise ConfigError(f"model.name: directory not found: {name}")
    elif name not in EMBEDDED_MODELS and not cfg.allow_download and not in_hf_cache(name):
        raise ConfigError(
            f"model.name: {name} is not a local directory and not in the Hugging Face cache; deft does not download "
            "models unless the config says model.allow_download: true")
    try:
        return resolve_model_path(cfg)
    except FileNotFoundError as e:
        raise ConfigError(f"model.name: {e}") from None


def check_label_words(task: Task, model_path: str, cfg: ModelConfig) -> None:
    """A verbalizer task's label words must start with different tokens of this tokenizer."""
    if not isinstance(task, VerbalizerTask):
        return
    from actors.model import load_tokenizer
    from actors.scorer import verbalizer_token_ids

    try:
        tokenizer = load_tokenizer(model_path, cfg)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: the tokenizer of {model_path} does not load: {_first_line(e)}") from None
    try:
        verbalizer_token_ids(tokenizer, task.label_words)
    except ValueError as e:
        raise ConfigError(f"task.label_words: {e}") from None


def check_resources(cfg: Config):
    """The resource plan, or a ConfigError if the cluster can never place it (instead of waiting forever)."""
    import ray

    from cluster.plan import plan_resources

    total = ray.cluster_resources()
    try:
        plan = plan_resources(total, cfg.scoring.num_actors, cfg.cluster.scorer_cpus, train_workers=cfg.train.num_workers)
    except ValueError as e:
        raise ConfigError(f"cluster: {e}") from None
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    asks = {"scorer": {"CPU": plan.scorer_cpus, "GPU": plan.scorer_gpus}, "train worker": plan.train_resources}
    for who, ask in asks.items():
        ask = {k: v for k, v in ask.items() if v}
        if not any(all(node.get(k, 0) >= v for k, v in ask.items()) for node in nodes):
            raise ConfigError(
                f"cluster: no node can hold a {who} ({_resources(ask)}); the cluster has {_resources(total)}. "
                "Lower cluster.scorer_cpus or train.num_workers, or add resources")
    need = {"CPU": plan.num_scorers * plan.scorer_cpus, "GPU": plan.num_scorers * plan.scorer_gpus}
    short = {k: v for k, v in need.items() if v > total.get(k, 0)}
    if short:
        raise ConfigError(f"cluster: {plan.num_scorers} scorers need {_resources(need)}; the cluster has "
                          f"{_resources(total)}. Lower scoring.num_actors or cluster.scorer_cpus")
    return plan


def preflight(cfg: Config, task: Task, need_labels: bool, cluster: bool = True, test: bool = True) -> Checked:
    """Check the pool, (with `test`) the test split, the model, the label words and (with `cluster`) the
    resource plan against the cluster, connecting to it."""
    stay_offline(cfg)
    try:
        pool = pool_from_config(cfg.data, task, DATA_SEED, require_label=need_labels)
    except DataError as e:
        raise DataError(f"data.path: {e}") from None
    try:
        test = eval_split_from_config(cfg.data, task, DATA_SEED, cfg.al.eval_limit) if test else None
    except DataError as e:
        raise DataError(f"data.test_path: {e}") from None
    model_path = check_model(cfg.model)
    check_label_words(task, model_path, cfg.model)
    if cluster:
        from cluster.runtime import connect

        connect(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.temp_dir)
        check_resources(cfg)
    return Checked(pool, test, model_path)


def _resources(res: dict) -> str:
    return ", ".join(f"{res.get(k, 0):g} {k}" for k in ("CPU", "GPU") if k in res or k == "CPU")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
