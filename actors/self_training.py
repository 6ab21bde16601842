"""LiST (arXiv 2110.06274) student training: a fresh LoRA learns the teacher's soft pseudo-labels.

Per step, a batch of pseudo-labelled rows is weighted and trained with per-example KL(teacher || student)
over the label words (temperature 1, no sharpening):
  - distillation warm-up (the first `warmup_fraction` of the steps): every row weighs 1/batch;
  - after it, meta re-weighting (Ren et al. 2018, as in the authors' code): from w = 0, one virtual SGD
    step (lr `meta_lr`) on sum_i w_i l_i, the loss of a gold meta-batch at the stepped parameters, then
    w = max(-dL_meta/dw, 0) normalised to sum 1 (w / (sum w + 1e-6)), and the real step on sum_i w_i l_i.

The virtual step runs through `torch.func.functional_call` over the LoRA tensors only (the base is
frozen), so no meta-learning library is needed. One loop serves both trainers: the in-process one (plain
AdamW) and Ray Train's (a DeepSpeed engine), through the `backward`/`step` pair both expose.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from actors.trainer import LoraRecipe, at_least_fp32, collate, encode_example, forward_answer, label_word_logits, to_device

NORM_EPS = 1e-6


def kl_per_example(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per row, over the label words: sum_c p_c (log p_c - log q_c), with 0 log 0 = 0."""
    log_q = F.log_softmax(at_least_fp32(student_logits), dim=-1)
    p = teacher_probs.to(log_q.dtype)
    return (torch.xlogy(p, p) - p * log_q).sum(-1)


@dataclass
class PseudoData:
    """Encoded rows: pseudo-labelled (prompt + the first label word as a placeholder answer, so the answer
    position is found as in gold training; the target itself is unused) with the teacher's distribution,
    and the gold rows the meta-batches come from."""

    pseudo: list[tuple[list[int], list[int]]]
    teacher: torch.Tensor  # [n_pseudo, C]
    pseudo_ids: list[str]
    gold: list[tuple[list[int], list[int]]]

    @classmethod
    def encode(cls, tokenizer, pseudo_rows: list[dict], gold_rows: list[dict], label_words: list[str],
               max_length: int) -> "PseudoData":
        pseudo_rows = sorted(pseudo_rows, key=lambda r: r["example_id"])
        gold_rows = sorted(gold_rows, key=lambda r: r["example_id"])
        return cls(
            pseudo=[encode_example(tokenizer, r["prompt"], label_words[0], max_length, False) for r in pseudo_rows],
            teacher=torch.tensor([r["probs"] for r in pseudo_rows], dtype=torch.float32),
            pseudo_ids=[r["example_id"] for r in pseudo_rows],
            gold=[encode_example(tokenizer, r["prompt"], r["target"], max_length, False) for r in gold_rows],
        )


def _label_logits(model, batch: dict, label_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = forward_answer(model, batch)
    return label_word_logits(logits, labels, label_ids.to(logits.device))


def meta_gradient(model, pseudo_batch: dict, teacher: torch.Tensor, gold_batch: dict, label_ids: torch.Tensor,
                  meta_lr: float) -> torch.Tensor:
    """-dL_meta/dw at w = 0, where L_meta is the gold meta-batch's verbalizer cross-entropy after one
    virtual SGD step (lr meta_lr) on sum_i w_i KL_i. Second-order: the inner gradient keeps its graph."""
    return _meta_gradient_and_logits(model, pseudo_batch, teacher, gold_batch, label_ids, meta_lr)[0]


def _meta_gradient_and_logits(model, pseudo_batch: dict, teacher: torch.Tensor, gold_batch: dict,
                              label_ids: torch.Tensor, meta_lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """meta_gradient, and the pseudo batch's label-word logits at the current parameters with their graph
    kept: the real step reuses them rather than forwarding the batch a second time (same dropout mask)."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names, params = list(named), list(named.values())
    eps = torch.zeros(teacher.shape[0], device=teacher.device, dtype=params[0].dtype, requires_grad=True)

    def call(weights: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        # Only the LoRA tensors are substituted; the frozen base comes from the module itself.
        return _label_logits(lambda **kw: functional_call(model, weights, args=(), kwargs=kw), batch, label_ids)

    # The fused attention kernels (flash, memory-efficient; CPU and CUDA) have no double backward; the
    # math kernel is plain differentiable ops.
    with sdpa_kernel(SDPBackend.MATH):
        z, _ = call(named, pseudo_batch)
        inner = (eps * kl_per_example(z, teacher)).sum()
        grads = torch.autograd.grad(inner, params, create_graph=True)
        stepped = {n: p - meta_lr * g for n, p, g in zip(names, params, grads)}
        z_meta, gold = call(stepped, gold_batch)
        (g_eps,) = torch.autograd.grad(F.cross_entropy(z_meta, gold), eps, retain_graph=True)  # z's graph lives on
    return -g_eps.detach(), z


def meta_weights(model, pseudo_batch: dict, teacher: torch.Tensor, gold_batch: dict, label_ids: torch.Tensor,
                 meta_lr: float, with_logits: bool = False):
    """Per-example weights for one pseudo-labelled batch: max(-dL_meta/dw, 0), normalised to sum 1; with
    `with_logits`, also the batch's logits (with graph) for the real step."""
    g, z = _meta_gradient_and_logits(model, pseudo_batch, teacher, gold_batch, label_ids, meta_lr)
    w = torch.clamp(g, min=0.0)
    w = w / (w.sum() + NORM_EPS)
    return (w, z) if with_logits else w


class PlainEngine:
    """DeepSpeed's engine interface (`module`, `backward`, `step`) over a plain AdamW + schedule, so one
    student loop serves both trainers."""

    def __init__(self, model, optimizer, schedule, max_grad_norm: float):
        self.module, self.optimizer, self.schedule, self.max_grad_norm = model, optimizer, schedule, max_grad_norm
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)


def student_batches(n: int, global_batch: int, steps: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's pseudo-row indices for every step: seeded epoch permutations cut into global batches
    (the same on every rank, so ranks step together), each sliced by rank."""
    out, epoch = [], 0
    while len(out) < steps:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        for start in range(0, n, global_batch):
            batch = perm[start:start + global_batch]
            if len(batch) < world:
                batch += (perm * world)[: world - len(batch)]
            out.append(batch[rank::world])
            if len(out) == steps:
                break
        epoch += 1
    return out


def train_student(engine, data: PseudoData, st: dict, label_ids: torch.Tensor, pad_id: int, seed: int,
                  rank: int = 0, world: int = 1, device: torch.device = torch.device("cpu"),
                  on_step: Optional[Callable[[int, float], None]] = None,
                  reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict:
    """Run `st["steps"]` student steps; returns the losses and, per pseudo row, its mean meta-weight (NaN
    for a row never re-weighted). `reduce` sums the per-row tallies over ranks."""
    steps, warm = st["steps"], math.ceil(st["warmup_fraction"] * st["steps"])
    g = torch.Generator().manual_seed(seed * 7919 + 1)
    weight_sum = torch.zeros(len(data.pseudo_ids), dtype=torch.float64)
    weight_n = torch.zeros(len(data.pseudo_ids), dtype=torch.float64)
    losses = []
    model = engine.module
    for step, idx in enumerate(student_batches(len(data.pseudo), st["batch_size"], steps, seed, rank, world)):
        # Drawn every step on every rank, warm-up included, so the stream does not depend on the phase.
        meta_idx = torch.randint(len(data.gold), (st["meta_batch"],), generator=g).tolist()
        batch = to_device(collate([data.pseudo[i] for i in idx], pad_id), device)
        teacher = data.teacher[idx].to(device)
        model.train()
        if step < warm:
            w = torch.full((len(idx),), 1.0 / len(idx), device=device)
            z, _ = _label_logits(engine, batch, label_ids)
        else:  # the meta-gradient's forward of this batch is also the real step's
            gold = to_device(collate([data.gold[i] for i in meta_idx], pad_id), device)
            w, z = meta_weights(model, batch, teacher, gold, label_ids, st["meta_lr"], with_logits=True)
            weight_sum[idx] += w.double().cpu()
            weight_n[idx] += 1
        loss = (w * kl_per_example(z, teacher)).sum()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.item()))
        if on_step is not None:
            on_step(step, losses[-1])
    weight_sum, weight_n = reduce(weight_sum), reduce(weight_n)
    mean_w = torch.where(weight_n > 0, weight_sum / weight_n.clamp_min(1), torch.full_like(weight_sum, float("nan")))
    return {"loss": losses, "weights": dict(zip(data.pseudo_ids, mean_w.tolist())), "steps": steps,
            "warmup_steps": warm}


# ---- the two trainers --------------------------------------------------------------------------------
WEIGHTS_FILE = "pseudo_weights.json"  # written beside the student adapter: {example_id: mean meta-weight}


def _student_setup(loop, tokenizer):
    from actors.scorer import verbalizer_token_ids

    if not loop.self_training or not loop.label_words:
        raise ValueError("student training needs loop.self_training and the task's label words")
    return torch.tensor(verbalizer_token_ids(tokenizer, loop.label_words))


def _write_weights(out_dir: str, weights: dict) -> None:
    import json
    import os

    with open(os.path.join(out_dir, WEIGHTS_FILE), "w") as f:
        json.dump({k: (None if math.isnan(v) else v) for k, v in weights.items()}, f)


def _student_metrics(result: dict, n: int, setup_s: float, train_s: float, world: int) -> dict:
    return {"epoch_loss": [sum(result["loss"]) / max(1, len(result["loss"]))], "loss_by_step": result["loss"],
            "examples": n, "steps": result["steps"], "warmup_steps": result["warmup_steps"], "world_size": world,
            "setup_s": setup_s, "train_s": train_s}


def train_student_in_process(loop, pseudo_rows: list[dict], gold_rows: list[dict], out_dir: str) -> dict:
    """A fresh student on the pseudo-labels, in this process (train.backend local); writes a PEFT adapter
    dir and its WEIGHTS_FILE to out_dir."""
    import time

    from tqdm.auto import tqdm

    from actors.trainer import build_optimizer, build_schedule, in_process_model

    t0 = time.perf_counter()
    model_cfg, cfg, tok, model = in_process_model(loop)  # loop.init_adapter is None: a fresh student
    label_ids = _student_setup(loop, tok)
    data = PseudoData.encode(tok, pseudo_rows, gold_rows, loop.label_words, model_cfg.max_length)
    opt = build_optimizer(model, cfg)
    engine = PlainEngine(model, opt, build_schedule(opt, cfg, loop.self_training["steps"]), cfg.max_grad_norm)
    setup_s, t1 = time.perf_counter() - t0, time.perf_counter()
    bar = tqdm(total=loop.self_training["steps"], desc="student", unit="step", leave=False)
    result = train_student(engine, data, loop.self_training, label_ids, tok.pad_token_id, loop.seed,
                           device=model.device, on_step=lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.4f}")))
    bar.close()
    train_s = time.perf_counter() - t1
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    _write_weights(out_dir, result["weights"])
    return _student_metrics(result, len(data.pseudo), setup_s, train_s, 1)


class StudentRecipe(LoraRecipe):
    """The student inside Ray Train: the gold recipe's model, DeepSpeed engine and checkpointing, with the
    student's optimizer settings (loop.train) and the pseudo-label loop. Datasets: "train" holds the
    pseudo-labelled rows (example_id, prompt, probs), "gold" the labelled ones (example_id, prompt, target)."""

    def train(self) -> dict:
        import time

        t0 = time.perf_counter()
        model = self._setup_model()
        label_ids = _student_setup(self.loop, self.tokenizer)
        data = PseudoData.encode(self.tokenizer, self._read_dataset("train", ["example_id", "prompt", "probs"]),
                                 self._read_dataset("gold", ["example_id", "prompt", "target"]),
                                 self.loop.label_words, self.model_cfg.max_length)
        engine = self._setup_engine(model, self.loop.self_training["steps"])
        setup_s, t1 = time.perf_counter() - t0, time.perf_counter()

        def progress(step: int, loss: float) -> None:
            self.step_done(step + 1, self.loop.self_training["steps"], loss)
            if self.rank == 0 and (step + 1) % 10 == 0:  # to the worker log (the console with -v)
                print(f"[deft student] step {step + 1}/{self.loop.self_training['steps']} loss {loss:.4f}", flush=True)

        result = train_student(engine, data, self.loop.self_training, label_ids, self.tokenizer.pad_token_id,
                               self.loop.seed, self.rank, self.world, self.device, progress,
                               reduce=self._sum_tensor_across_ranks)
        metrics = _student_metrics(result, len(data.pseudo), setup_s, time.perf_counter() - t1, self.world)
        self.save_checkpoint(engine, metrics, extra=lambda d: _write_weights(d, result["weights"]))
        return metrics
