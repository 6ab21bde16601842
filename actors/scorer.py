"""The scorer: holds the base model + a LoRA adapter and turns prompts into uncertainty columns.

A plain class, so it runs in-process in tests and as a long-lived Ray actor (`ray.remote(Scorer)`) in a
run. `__init__` loads the model once; `set_adapter` swaps LoRA weights in place; `score` is a pure
function of (prompts, adapter, mode, seed).

Modes:
  base  adapter disabled, eval mode, one deterministic pass: u_base.
  lora  adapter on, T passes with the LoRA input dropout (and optionally attention dropout) really
        sampling: u_lora. Greedy answers for generation tasks are produced in eval mode first.
  eval  adapter on, eval mode, one deterministic pass: predictions and confidences for evaluation.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Any, Iterable, Optional

import torch

from actors.model import (FastDropout, attach_lora, load_adapter_state, load_model, load_tokenizer, set_mc_dropout,
                          use_fast_dropout)
from pipeline.config import LoraConfig, ModelConfig, ScoringConfig, TaskConfig, from_dict
from pipeline.tasks import GenerationTask, VerbalizerTask, get_task
from pipeline.uncertainty import generation_uncertainty, token_nll_and_entropy, verbalizer_uncertainty

log = logging.getLogger(__name__)
MODES = ("base", "lora", "eval")
# A block's common prompt prefix is run once per pass, and its keys and values reused by every row, when it
# is at least this many tokens. Shorter ones save less than the extra forward costs: BoolQ's own 12-token
# lead-in ("Please answer the following question with true or false, question:") saved nothing measurable
# on 2 CPU cores (SmolLM2-135M, 96 rows, T=3), and on a GPU a small model's forward is bound by kernel
# dispatch whatever its length (~70 ms for SmolLM2-135M on an H100). deft's own templates never reach it;
# templated and few-shot prompts (a long shared instruction) do.
MIN_SHARED_PREFIX = 32


class StaleAdapter(RuntimeError):
    """A unit that needs the current adapter reached a scorer that does not hold it (restarted by Ray)."""


def verbalizer_token_ids(tokenizer, words: Iterable[str]) -> list[int]:
    """The first token of each label word; they must differ, or the labels cannot be told apart."""
    ids = []
    for w in words:
        toks = tokenizer(w, add_special_tokens=False).input_ids
        if not toks:
            raise ValueError(f"label word {w!r} encodes to no tokens")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {list(words)} share a first token {ids}; choose words that differ in it")
    return ids


def positions(mask: torch.Tensor) -> torch.Tensor:
    # Left padding: real tokens get positions 0..n-1, as they would unpadded.
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def shared_prefix(seqs: list[list[int]]) -> int:
    """Tokens every row of a block starts with, leaving each row at least its last token (whose logits are
    the answer). 0 when the shared part is too short to be worth a forward of its own."""
    if len(seqs) < 2:
        return 0
    n = min(len(os.path.commonprefix(seqs)), min(len(s) for s in seqs) - 1)  # commonprefix takes any sequences
    return n if n >= MIN_SHARED_PREFIX else 0


def plain_kv_cache(model, device) -> bool:
    """Whether every layer of `model`'s KV cache is plain full attention (transformers' DynamicLayer), the
    only kind a shared prefix is exact for: a sliding window counts the pads between the prefix and a row
    as distance, and linear-attention or recurrent layers would run their state over those pads."""
    from transformers.cache_utils import DynamicLayer

    with torch.inference_mode():
        cache = model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), use_cache=True,
                      logits_to_keep=1).past_key_values
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) padded on the left, so every row's last token is at position -1."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


class Scorer:
    def __init__(
        self,
        model_path: str,
        model: dict,
        lora: dict,
        task: dict,
        scoring: dict,
        num_threads: Optional[int] = None,
        seed: int = 0,
    ):
        # Plain dicts in, typed configs rebuilt here: the actor never depends on driver globals.
        self.model_cfg = from_dict(ModelConfig, model)
        self.scoring_cfg = from_dict(ScoringConfig, scoring)
        self.task = get_task(from_dict(TaskConfig, task))
        if num_threads:
            torch.set_num_threads(num_threads)
        self.seed = seed
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.tokenizer = load_tokenizer(model_path, self.model_cfg)
        base = load_model(model_path, self.model_cfg, self.device)
        self.model = attach_lora(base, from_dict(LoraConfig, lora))
        if self.device.type == "cpu":
            use_fast_dropout(self.model)
        self.model_loads = 1
        self.adapter_version = 0
        self._last_group = (None, None)  # ((inputs file, row group), its rows): see _row_group
        self.adapter_token: Optional[int] = 0  # which broadcast adapter this actor holds: 0, the initial one (B = 0)
        if isinstance(self.task, VerbalizerTask):
            self.label_ids = torch.tensor(verbalizer_token_ids(self.tokenizer, self.task.label_words), device=self.device)
        # scoring.share_prefix applies where it is exact: verbalizer scoring on a full-attention KV cache
        asked = self.scoring_cfg.share_prefix and isinstance(self.task, VerbalizerTask)
        self.prefix_sharing = asked and plain_kv_cache(self.model, self.device)
        if asked and not self.prefix_sharing:
            log.info("scoring.share_prefix: %s has sliding-window or non-attention cache layers; every row runs "
                     "its whole prompt", type(base).__name__)

    # ---- adapter -------------------------------------------------------------------------------------
    def set_adapter(self, state: dict[str, torch.Tensor], token: Optional[int] = None) -> int:
        """Swap in new LoRA weights (arrives through the object store); returns the new version. `token`
        names the adapter (the driver's count of broadcasts); `score_unit` checks it."""
        load_adapter_state(self.model, {k: v.to(self.device) for k, v in state.items()})
        self.adapter_version += 1
        self.adapter_token = token
        return self.adapter_version

    def info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "model_loads": self.model_loads,
            "adapter_version": self.adapter_version,
            "device": str(self.device),
            "dtype": str(next(self.model.parameters()).dtype),
            "threads": torch.get_num_threads(),
        }

    # ---- scoring -------------------------------------------------------------------------------------
    def score(self, batch: dict[str, list], mode: str, seed: Optional[int] = None,
              batch_size: Optional[int] = None) -> dict[str, list]:
        """Uncertainty columns for `batch` (example_id, prompt), in the batch's own row order. `seed` (default:
        the actor's) seeds the MC dropout masks, so one actor can serve runs of different seeds. `batch_size`
        (default: scoring.batch_size, or this device's default) is rows per forward pass."""
        if mode not in MODES:
            raise ValueError(f"mode should be one of {MODES}, got {mode!r}")
        unexpected = set(batch) - {"example_id", "prompt"}
        if unexpected:  # label-free by construction: a scorer refuses anything beyond ids and prompts
            raise ValueError(f"a scorer only takes example_id and prompt, got extra columns {sorted(unexpected)}")
        ids, prompts = list(batch["example_id"]), list(batch["prompt"])
        enc = self.tokenizer(prompts, add_special_tokens=True, truncation=True, max_length=self.model_cfg.max_length)
        lengths = [len(x) for x in enc.input_ids]
        order = sorted(range(len(ids)), key=lambda i: lengths[i])  # similar lengths share a batch: little padding
        rows: list[Optional[dict]] = [None] * len(ids)
        bs = batch_size or self.scoring_cfg.batch_size_on(self.device.type == "cuda")
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            key = f"{self.seed if seed is None else seed}:{ids[idx[0]]}"
            for i, r in zip(idx, self._score_batch([enc.input_ids[i] for i in idx], mode, key)):
                rows[i] = r
        columns = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
        return {"example_id": ids, **columns}

    def score_unit(self, path: str, group: int, offsets, batch_size: int, mode: str, seed: Optional[int],
                   out_path: str, adapter_token: Optional[int] = None) -> int:
        """Score rows `offsets` of row group `group` of a pool's inputs file, in consecutive micro-batches of
        `batch_size` (the driver's `plan_units` fixed them), and write the scores to `out_path` as Parquet,
        atomically. Only example_id and prompt are read. Returns the number of rows.

        Modes that use the adapter refuse to run unless this actor holds adapter `adapter_token`: an actor
        Ray restarted after a crash starts without one, and must not score with untrained weights before
        the driver has sent it the adapter again."""
        import pyarrow as pa

        from pipeline.io import write_parquet

        if mode != "base" and adapter_token != self.adapter_token:
            raise StaleAdapter(f"this scorer holds adapter {self.adapter_token}, the unit needs {adapter_token}")

        rows = self._row_group(path, group).take(pa.array(offsets, pa.int64()))
        parts = [pa.table(self.score(rows.slice(i, batch_size).to_pydict(), mode, seed, batch_size))
                 for i in range(0, rows.num_rows, batch_size)]
        write_parquet(out_path, pa.concat_tables(parts))
        return rows.num_rows

    def _row_group(self, path: str, group: int):
        """Row group `group` of `path` (example_id, prompt only); the last one read is kept, since small
        calls cut one row group into several units."""
        import pyarrow.parquet as pq

        if self._last_group[0] != (path, group):
            self._last_group = ((path, group), pq.ParquetFile(path).read_row_group(group, columns=["example_id", "prompt"]))
        return self._last_group[1]

    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = left_pad(seqs, self.tokenizer.pad_token_id)
        return ids.to(self.device), mask.to(self.device)

    @contextlib.contextmanager
    def _mode(self, mode: str, sample: bool):
        if mode == "base":
            self.model.eval()
            with self.model.disable_adapter():
                yield
            return
        if sample and mode == "lora":
            set_mc_dropout(self.model, lora=True, attention=self.model_cfg.attention_dropout > 0)
        else:  # every other pass is deterministic, whatever mode the model was left in (a fresh actor's first call)
            self.model.eval()
        try:
            yield
        finally:
            self.model.eval()

    def _passes(self, mode: str) -> int:
        return self.scoring_cfg.mc_passes if mode == "lora" else 1

    def _seed(self, key: str) -> None:
        # A batch's dropout masks depend on the run seed and its first example_id only (key = "seed:id"), so a result does
        # not depend on which actor scored it or in what order.
        digest = hashlib.sha256(key.encode()).digest()
        torch.manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
        FastDropout.reseed(int.from_bytes(digest[8:16], "little"))  # the CPU masks' bits (actors.model)

    @torch.inference_mode()
    def _score_batch(self, seqs: list[list[int]], mode: str, key: str) -> list[dict]:
        self._seed(key)
        if isinstance(self.task, GenerationTask):
            return self._score_generation(seqs, mode)
        return self._score_verbalizer(seqs, mode)

    def _score_verbalizer(self, seqs: list[list[int]], mode: str) -> list[dict]:
        p = shared_prefix(seqs) if self.prefix_sharing else 0
        prefix = torch.tensor([seqs[0][:p]], device=self.device) if p else None
        ids, mask = self._pad([s[p:] for s in seqs])
        passes = []
        with self._mode(mode, sample=True):
            for _ in range(self._passes(mode)):
                logits = self._last_logits(ids, mask, prefix)
                passes.append(torch.softmax(logits[:, self.label_ids].float(), dim=-1))
        # One device-to-host copy per batch, not one per value (on a GPU each is a sync).
        u = {k: v.cpu() for k, v in verbalizer_uncertainty(torch.stack(passes, dim=1)).items()}
        confidence, best = u["probs"].max(-1)
        pe = -torch.log(confidence.clamp_min(1e-12))  # NLL of the model's own answer
        cols = {k: u[k].tolist() for k in ("entropy", "bald", "least_confidence", "margin")}
        labels, probs = self.task.labels, u["probs"].tolist()
        pe, confidence, best = pe.tolist(), confidence.tolist(), best.tolist()
        return [
            {
                **{k: v[i] for k, v in cols.items()},
                "pe": pe[i],
                "probs": probs[i],
                "prediction": labels[best[i]],
                "confidence": confidence[i],
                "n_tokens": len(seqs[i]),
            }
            for i in range(len(seqs))
        ]

    def _last_logits(self, ids: torch.Tensor, mask: torch.Tensor, prefix: Optional[torch.Tensor]) -> torch.Tensor:
        """Next-token logits after each row's last token. With `prefix` (the block's shared first tokens,
        cut from `ids`), the prefix runs once, as one row, and every row attends to its keys and values:
        the rows' own tokens are the only ones computed per row. In a sampling pass the prefix's dropout
        mask is then one mask shared by the block's rows: each row still gets a fresh mask per pass, so its
        T passes remain T samples of its own predictive distribution, but the rows of a block share the
        prefix's part of the noise, so their estimates' errors are correlated (top-k compares rows)."""
        if prefix is None:
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=1).logits[:, -1]
        cache = self.model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(ids.shape[0])
        full_mask = torch.cat([mask.new_ones(ids.shape[0], prefix.shape[1]), mask], dim=1)  # prefix, pads, row
        pos = prefix.shape[1] + positions(mask)
        return self.model(input_ids=ids, attention_mask=full_mask, position_ids=pos, past_key_values=cache,
                          use_cache=True, logits_to_keep=1).logits[:, -1]

    def _greedy(self, ids: torch.Tensor, mask: torch.Tensor, mode: str) -> list[list[int]]:
        eos = self.tokenizer.eos_token_id
        with self._mode(mode, sample=False):
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=self.task.max_new_tokens,
                do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
            )
        answers = []
        for row in out[:, ids.shape[1]:].tolist():
            cut = row.index(eos) + 1 if eos in row else len(row)  # keep the EOS: stopping is part of the answer
            answers.append(row[:cut] or [eos])
        return answers

    def _score_generation(self, seqs: list[list[int]], mode: str) -> list[dict]:
        ids, mask = self._pad(seqs)
        answers = self._greedy(ids, mask, mode)
        width = max(len(a) for a in answers)
        ans = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        ans_mask = torch.zeros_like(ans)
        for i, a in enumerate(answers):
            ans[i, : len(a)] = torch.tensor(a)
            ans_mask[i, : len(a)] = 1
        full, full_mask = torch.cat([ids, ans], 1), torch.cat([mask, ans_mask], 1)
        pos = positions(full_mask)
        nll, ent = [], []
        with self._mode(mode, sample=True):
            for _ in range(self._passes(mode)):
                logits = self.model(input_ids=full, attention_mask=full_mask, position_ids=pos, logits_to_keep=width + 1).logits
                n, e = token_nll_and_entropy(logits[:, :-1], ans, ans_mask)  # position j predicts answer token j
                nll.append(n)
                ent.append(e)
        u = {k: v.cpu().tolist() for k, v in generation_uncertainty(torch.stack(nll, 1), torch.stack(ent, 1)).items()}
        texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        return [
            {
                "pe": u["pe"][i],
                "me": u["me"][i],
                "confidence": u["confidence"][i],
                "least_confidence": 1.0 - u["confidence"][i],
                "answer": texts[i],
                "prediction": self.task.extract(texts[i]),
                "n_tokens": len(seqs[i]) + len(answers[i]),
            }
            for i in range(len(seqs))
        ]
