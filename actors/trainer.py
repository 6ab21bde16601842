"""Constraint-LoRA training inside Ray Train: `train_loop_per_worker` drives a DeepSpeed engine.

Constraint LoRA (STAR): decoupled L2 decay on the LoRA B matrices only (paper: 0.5), none on A, dropout
on the LoRA input (paper: 0.1), optional label smoothing. The loss is on answer tokens only.

Every worker holds the whole (small) labelled set, sorted by example_id, and takes its rank's slice of
each seeded global batch. Ranks therefore always run the same number of steps (ZeRO's collectives need
that), nothing is dropped, and a given seed gives the same batches on any cluster.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from cluster.runtime import quiet_libraries
from pipeline.config import LoraConfig, ModelConfig, TrainConfig, from_dict

quiet_libraries()  # Ray Train workers import this module: the driver's filters (-v: none)

IGNORE = -100


# ---- data --------------------------------------------------------------------------------------------
def encode_example(tokenizer, prompt: str, target: str, max_length: int, add_eos: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with the prompt masked. The prompt is cut from the left if the pair is too long,
    and encoded exactly as the scorer encodes it, so the trained answer token is the one scored."""
    p = tokenizer(prompt, add_special_tokens=True).input_ids
    t = tokenizer(target, add_special_tokens=False).input_ids
    if add_eos and tokenizer.eos_token_id is not None:
        t = t + [tokenizer.eos_token_id]
    if not t:
        raise ValueError(f"target {target!r} encodes to no tokens")
    t = t[:max_length - 1]
    p = p[-(max_length - len(t)):]
    return p + t, [IGNORE] * len(p) + t


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a micro-batch (padded positions carry no loss), as the scorer pads: every row's answer then
    ends at the last position, so the head only has to run over the last `answer_span` + 1 positions."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    span = 1
    for i, (x, y) in enumerate(examples):
        ids[i, width - len(x):] = torch.tensor(x)
        labels[i, width - len(y):] = torch.tensor(y)
        mask[i, width - len(x):] = 1
        span = max(span, len(y) - next((j for j, t in enumerate(y) if t != IGNORE), len(y)))
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # real tokens at 0..n-1, as unpadded
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels,
            "answer_span": span}


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over answer tokens (position j predicts token j+1)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, label_smoothing=label_smoothing
    )


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 up to fp32 for a loss; fp64 (the finite-difference tests) stays fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def label_word_logits(logits: torch.Tensor, labels: torch.Tensor, label_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits over the label words at the position that predicts each row's first answer token [B, C],
    the index of each row's gold label word [B]): the distribution the scorer reads, with its target."""
    first = (labels != IGNORE).int().argmax(-1)
    if bool((first == 0).any()):
        raise ValueError("an answer starts at the first kept position: keep one more logit position")
    rows = torch.arange(labels.shape[0], device=labels.device)
    z = at_least_fp32(logits[rows, first - 1][:, label_ids])
    match = labels[rows, first].unsqueeze(-1) == label_ids.unsqueeze(0)
    if not bool(match.any(-1).all()):
        raise ValueError("a training target does not start with a label word's first token")
    return z, match.int().argmax(-1)


def verbalizer_loss(logits: torch.Tensor, labels: torch.Tensor, label_ids: torch.Tensor,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the label words only (train.loss verbalizer)."""
    z, target = label_word_logits(logits, labels, label_ids)
    return F.cross_entropy(z, target, label_smoothing=label_smoothing)


def forward_answer(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) over the answer span (+1 position) of one collated batch: the output head
    (49,152 x 576 for SmolLM2) over every prompt position was ~20% of a training step's FLOPs."""
    keep = batch["answer_span"] + 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=keep).logits
    return logits, batch["labels"][:, -keep:]


def batch_loss(model, batch: dict, label_smoothing: float = 0.0, label_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The answer loss of one collated batch: over the label words if `label_ids` is given, else the LM loss."""
    logits, labels = forward_answer(model, batch)
    if label_ids is not None:
        return verbalizer_loss(logits, labels, label_ids.to(logits.device), label_smoothing)
    return answer_loss(logits, labels, label_smoothing)


def loss_label_ids(tokenizer, loop: "LoopConfig") -> Optional[torch.Tensor]:
    """The label words' first tokens when training with the verbalizer loss, else None (LM loss)."""
    if loop.loss != "verbalizer":
        return None
    from actors.scorer import verbalizer_token_ids

    return torch.tensor(verbalizer_token_ids(tokenizer, loop.label_words))


def rank_batches(n: int, global_batch: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's row indices for every step of one epoch. A seeded permutation is cut into global
    batches; a short last batch is topped up from the epoch's start so every rank gets >= 1 row."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    steps = []
    for start in range(0, n, global_batch):
        batch = perm[start : start + global_batch]
        if len(batch) < world:
            batch += (perm * world)[: world - len(batch)]
        steps.append(batch[rank::world])
    return steps


# ---- optimisation ------------------------------------------------------------------------------------
def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with decoupled decay `weight_decay_b` on LoRA B and `weight_decay_a` on everything else
    trainable (LoRA A). Decay on B shrinks the adapter's output; decay on A would only rescale it."""
    b, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (b if "lora_B" in name else other).append(p)
    if not b:
        raise ValueError("no trainable LoRA B parameters found: is the model wrapped with attach_lora?")
    groups = [{"params": b, "weight_decay": cfg.weight_decay_b, "name": "lora_B"}]
    if other:
        groups.append({"params": other, "weight_decay": cfg.weight_decay_a, "name": "lora_A"})
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def training_model_config(model: dict) -> ModelConfig:
    """The model config for training: model.attention_dropout is for MC scoring only, never for training
    (the recipe's only dropout is the LoRA input dropout)."""
    return dataclasses.replace(from_dict(ModelConfig, model), attention_dropout=0.0)


# ---- the recipe --------------------------------------------------------------------------------------
@dataclass
class LoopConfig:
    """Everything `train_loop_per_worker` needs, as plain data (rebuilt into typed configs on the worker)."""

    model_path: str
    model: dict
    lora: dict
    train: dict
    add_eos: bool
    seed: int = 0
    threads: Optional[int] = None
    init_adapter: Any = None  # an ObjectRef to an adapter state, for warm starts
    loss: str = "lm"  # train.loss: lm or verbalizer
    label_words: Optional[list] = None  # the verbalizer's label words, for loss == "verbalizer"
    self_training: Optional[dict] = None  # set: train a LiST student on pseudo-labels (actors.self_training)
    progress: Any = None  # a ray.util.queue.Queue: rank 0 puts (step, total, loss) for the driver's progress bar


class LoraRecipe:
    def __init__(self, loop: LoopConfig):
        self.loop = loop
        self.model_cfg = training_model_config(loop.model)
        self.lora_cfg = from_dict(LoraConfig, loop.lora)
        self.cfg = from_dict(TrainConfig, loop.train)
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if loop.threads:
            torch.set_num_threads(loop.threads)
        torch.manual_seed(loop.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.bf16 = self.cfg.precision == "bf16" or (
            self.cfg.precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )

    def step_done(self, step: int, total: int, loss: float) -> None:
        """Tell the driver's progress bar (rank 0 only; a full or gone queue only costs the bar a tick)."""
        if self.rank == 0 and self.loop.progress is not None:
            try:
                self.loop.progress.put_nowait((step, total, float(loss)))
            except Exception:  # noqa: BLE001 - the bar is cosmetic; training goes on
                pass

    def _setup_model(self):
        from actors.model import attach_lora, load_adapter_state, load_model, load_tokenizer

        self.tokenizer = load_tokenizer(self.loop.model_path, self.model_cfg)
        self.tokenizer.truncation_side = "left"
        self.label_ids = loss_label_ids(self.tokenizer, self.loop)
        # Master weights stay fp32; DeepSpeed's bf16 mode (GPU) keeps fp32 copies and computes in bf16.
        base = load_model(self.loop.model_path, self.model_cfg, self.device, dtype=torch.float32)
        model = attach_lora(base, self.lora_cfg, adapter_dtype_follows_base=False)
        if self.loop.init_adapter is not None:
            import ray

            load_adapter_state(model, ray.get(self.loop.init_adapter))
        model.config.use_cache = False
        return model

    @staticmethod
    def _read_dataset(name: str, columns: list[str]) -> list[dict]:
        """Every row of Ray Train dataset `name` (not split: each rank reads all), sorted by example_id."""
        import ray.train

        rows = []
        for batch in ray.train.get_dataset_shard(name).iter_batches(batch_size=1024, batch_format="pyarrow"):
            rows.extend(batch.select(columns).to_pylist())
        return sorted(rows, key=lambda r: r["example_id"])

    def _setup_data(self) -> list[tuple[list[int], list[int]]]:
        rows = self._read_dataset("train", ["example_id", "prompt", "target"])
        return [
            encode_example(self.tokenizer, r["prompt"], r["target"], self.model_cfg.max_length, self.loop.add_eos)
            for r in rows
        ]

    def _setup_engine(self, model, total_steps: int):
        import deepspeed

        from cluster.deepspeed import deepspeed_config, skip_unused_shm_op

        micro = math.ceil(self.cfg.batch_size / self.world)
        optimizer = build_optimizer(model, self.cfg)
        schedule = build_schedule(optimizer, self.cfg, total_steps)
        ds_cfg = deepspeed_config(self.cfg.zero_stage, micro, 1, self.world, self.bf16, self.cfg.max_grad_norm)
        skip_unused_shm_op()
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_cfg)
        return engine

    def train(self) -> dict:
        t0 = time.perf_counter()
        model = self._setup_model()
        data = self._setup_data()
        n = len(data)
        steps_per_epoch = math.ceil(n / self.cfg.batch_size)
        epochs = self.cfg.epochs_for(n)
        engine = self._setup_engine(model, epochs * steps_per_epoch)
        setup_s = time.perf_counter() - t0
        epoch_losses, step_losses, seen, t_train = [], [], 0, time.perf_counter()
        warm_seen, t_warm = 0, None  # steady state: everything after the first step
        for epoch in range(epochs):
            engine.train()
            total = 0.0
            for j, idx in enumerate(rank_batches(n, self.cfg.batch_size, epoch, self.loop.seed, self.rank, self.world)):
                batch = collate([data[i] for i in idx], self.tokenizer.pad_token_id)
                batch = to_device(batch, self.device)
                loss = batch_loss(engine, batch, self.cfg.label_smoothing, self.label_ids)
                engine.backward(loss)
                engine.step()
                step_losses.append(loss.item())
                total += step_losses[-1]
                seen += len(idx)
                self.step_done(epoch * steps_per_epoch + j + 1, epochs * steps_per_epoch, loss.item())
                if t_warm is None:
                    t_warm, warm_seen = time.perf_counter(), seen
            epoch_losses.append(self._mean_across_ranks(total / steps_per_epoch))
            if self.rank == 0:  # forwarded to the driver's console by Ray
                print(f"[deft train] epoch {epoch + 1}/{epochs} loss {epoch_losses[-1]:.4f} "
                      f"({seen / (time.perf_counter() - t_train):.1f} examples/s)", flush=True)
        t_end = time.perf_counter()
        train_s = t_end - t_train
        steady_s = t_end - t_warm if t_warm is not None else 0.0
        # Every step's loss, averaged over the ranks (one collective at the end): a spike shows here, where
        # an epoch's mean can hide it.
        step_loss = self._sum_tensor_across_ranks(torch.tensor(step_losses, dtype=torch.float64)) / self.world
        metrics = {
            "epoch_loss": epoch_losses,
            "step_loss": step_loss.tolist(),
            "examples": n,
            "steps": epochs * steps_per_epoch,
            "world_size": self.world,
            "setup_s": setup_s,
            "train_s": train_s,
            "examples_per_s": self._sum_across_ranks(seen) / train_s if train_s > 0 else 0.0,
            "steady_examples_per_s": self._sum_across_ranks(seen - warm_seen) / steady_s if steady_s > 0 else 0.0,
            "worker_start_unix": t0 - time.perf_counter() + time.time(),
        }
        self.save_checkpoint(engine, metrics)
        return metrics

    def _mean_across_ranks(self, value: float) -> float:
        return self._sum_across_ranks(value) / self.world

    def _sum_tensor_across_ranks(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        import torch.distributed as dist

        x = t.to(self.device) if dist.get_backend() == "nccl" else t.clone()
        dist.all_reduce(x)
        return x.cpu()

    def _sum_across_ranks(self, value: float) -> float:
        if self.world == 1:
            return float(value)
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.to(self.device)
        dist.all_reduce(t)
        return float(t.item())

    def save_checkpoint(self, engine, metrics: dict, extra=None) -> None:
        """Rank 0 writes a PEFT adapter dir (under ZeRO-3 after gathering the LoRA shards), plus whatever
        `extra(dir)` writes beside it; every rank reports."""
        import ray.train
        from ray.train import Checkpoint

        model = engine.module
        gather = _gathered(model) if self.cfg.zero_stage == 3 else _nothing()
        with gather, tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                model.save_pretrained(tmp, safe_serialization=True)
                if extra is not None:
                    extra(tmp)
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _gathered(model):
    import deepspeed

    params = [p for n, p in model.named_parameters() if "lora_" in n]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def in_process_model(loop: LoopConfig):
    """(model config, train config, tokenizer, fp32 model with LoRA) for training in this process, seeded
    by loop.seed before anything draws from the generator."""
    from actors.model import attach_lora, load_adapter_state, load_model, load_tokenizer

    model_cfg, cfg = training_model_config(loop.model), from_dict(TrainConfig, loop.train)
    if loop.threads:
        torch.set_num_threads(loop.threads)
    torch.manual_seed(loop.seed)
    tok = load_tokenizer(loop.model_path, model_cfg)
    model = attach_lora(load_model(loop.model_path, model_cfg, dtype=torch.float32), from_dict(LoraConfig, loop.lora),
                        adapter_dtype_follows_base=False)
    if loop.init_adapter is not None:
        load_adapter_state(model, loop.init_adapter)
    model.config.use_cache = False
    return model_cfg, cfg, tok, model


def train_in_process(loop: LoopConfig, rows: list[dict], out_dir: str) -> dict:
    """The same recipe without Ray or DeepSpeed: one process, plain torch AdamW. For laptops and tests
    (no 35-47 s Ray Train start-up per round), and the baseline of benchmarks.training."""
    t0 = time.perf_counter()
    model_cfg, cfg, tok, model = in_process_model(loop)
    label_ids = loss_label_ids(tok, loop)
    rows = sorted(rows, key=lambda r: r["example_id"])
    data = [encode_example(tok, r["prompt"], r["target"], model_cfg.max_length, loop.add_eos) for r in rows]
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    epochs = cfg.epochs_for(len(data))
    opt = build_optimizer(model, cfg)
    sched = build_schedule(opt, cfg, epochs * steps_per_epoch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    setup_s = time.perf_counter() - t0
    seen, warm_seen, t_warm, losses, t_train = 0, 0, None, [], time.perf_counter()
    steps: dict[str, list[float]] = {"step_loss": [], "step_lr": [], "step_grad_norm": []}  # a spike shows here
    from tqdm.auto import tqdm

    bar = tqdm(total=epochs * steps_per_epoch, desc="training", unit="step", leave=False)
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for idx in rank_batches(len(data), cfg.batch_size, epoch, loop.seed, 0, 1):
            batch = to_device(collate([data[i] for i in idx], tok.pad_token_id), model.device)
            loss = batch_loss(model, batch, cfg.label_smoothing, label_ids)
            opt.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            steps["step_lr"].append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
            steps["step_loss"].append(loss.item())
            steps["step_grad_norm"].append(norm.item())
            total += steps["step_loss"][-1]
            seen += len(idx)
            if t_warm is None:
                t_warm, warm_seen = time.perf_counter(), seen
            bar.update(1)
        losses.append(total / steps_per_epoch)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    t_end = time.perf_counter()
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return {
        "epoch_loss": losses, **steps, "examples": len(data), "steps": epochs * steps_per_epoch, "world_size": 1,
        "setup_s": setup_s, "train_s": t_end - t_train,
        "examples_per_s": seen / (t_end - t_train) if t_end > t_train else 0.0,
        "steady_examples_per_s": (seen - warm_seen) / (t_end - t_warm) if t_warm and t_end > t_warm else 0.0,
    }


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. `config` is plain data; the typed configs are rebuilt on the first line."""
    loop = LoopConfig(**config)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if loop.self_training:  # a LiST student on pseudo-labels
        from actors.self_training import StudentRecipe

        StudentRecipe(loop).train()
    else:
        LoraRecipe(loop).train()
