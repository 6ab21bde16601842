"""LiST self-training in a round (self_training.enabled): teacher -> pseudo-labels -> student -> gold fine-tune.

The round's gold-trained adapter is the first teacher. Each session s:
  1. the teacher soft-labels the unlabelled pool on the long-lived scoring actors (eval mode: no dropout,
     temperature 1); the scorer sees example_id and prompt only. Rows labelled in this round (the ones
     the oracle was asked about) are labelled by now, so they are not in the pool that is pseudo-labelled;
  2. a fresh student (base + new LoRA) trains on them (actors.self_training), with Ray Train + DeepSpeed
     or in-process, as train.backend says;
  3. the student is fine-tuned on the gold labels with the constraint-LoRA recipe (B decay);
  4. it becomes the next session's teacher.
The round's adapter (rounds/k/adapter, what scores and evaluates) is the last session's.

Beyond LiST (self_training.skip_one_class and min_teacher_information, both on by default): when every
pseudo-label is the same class, or the teacher's soft labels carry almost no information about their rows
(teacher_information), the session is skipped, its adapter is the teacher itself, and so are the later
sessions' (they would see the same teacher), so a teacher with only the class prior to teach is not
distilled into a fresh student.

    RUN/rounds/k/teacher/                      the gold-trained adapter (session 0's teacher)
    RUN/rounds/k/self_training/s/pseudo.parquet   example_id, source="pseudo", probs, confidence,
                                                  pseudo_label, weight (mean meta-weight; null if never re-weighted)
    RUN/rounds/k/self_training/s/student/      the student after pseudo-label training
    RUN/rounds/k/self_training/s/adapter/      the student after the gold fine-tune
    RUN/rounds/k/self_training/s/metrics.json

Pseudo rows live here, never in labeled.parquet: they are not labels (budget, round accounting and every
curve's x-axis count gold rows only) and are never exported for labelling. Each artifact is written
atomically and its existence is the resume point, so a run killed mid-session restarts that session's
unfinished step, which is seeded by (seed, round, session), and ends with the same adapter.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Config, to_dict
from pipeline.io import read_parquet, write_json, write_parquet
from pipeline.training import (ADAPTER_FILE, TrainResult, install_dir, fit_with_ray_train, read_adapter_state,
                               train_adapter, train_adapter_in_process)

log = logging.getLogger(__name__)


def session_seed(seed: int, k: int, session: int, purpose: str) -> int:
    """A seed for one step of one session, independent of everything that ran before it."""
    return int(np.random.SeedSequence([seed, k, session, sum(purpose.encode())]).generate_state(1)[0] % 2**31)


def student_loop_config(cfg: Config, model_path: str, threads: Optional[int], seed: int, label_words: list[str]):
    """The student's optimiser (LiST: AdamW at self_training.lr, weight decay 0, linear schedule, no
    warm-up) in the gold recipe's LoopConfig, plus the self-training settings."""
    from actors.trainer import LoopConfig

    st = cfg.self_training
    train = {**to_dict(cfg.train), "preset": None, "lr": st.lr, "batch_size": st.batch_size, "epochs": 1,
             "min_steps": 0, "warmup_ratio": 0.0, "schedule": "linear", "weight_decay_b": 0.0,
             "weight_decay_a": 0.0, "label_smoothing": 0.0, "loss": "verbalizer", "warm_start": False}
    return LoopConfig(model_path=model_path, model=to_dict(cfg.model), lora=to_dict(cfg.lora), train=train,
                      add_eos=False, seed=seed, threads=threads, loss="verbalizer", label_words=label_words,
                      self_training=to_dict(st))


class RoundSelfTraining:
    """The self-training part of round k's training phase, resumable at every step."""

    def __init__(self, run, k: int):
        self.run, self.k, self.cfg = run, k, run.cfg
        self.root = run.run_dir.round_dir(k) / "self_training"

    def teacher_dir(self) -> Path:
        return self.run.run_dir.round_dir(self.k) / "teacher"

    def session_dir(self, s: int) -> Path:
        return self.root / str(s)

    def run_sessions(self, gold: pa.Table) -> dict:
        """Every session not yet done; returns the round's self-training summary (also in metrics.json files)."""
        teacher = self.teacher_dir()
        summary = []
        for s in range(self.cfg.self_training.sessions):
            d = self.session_dir(s)
            if not (d / "adapter" / ADAPTER_FILE).is_file():
                self._session(s, teacher, gold)
            summary.append(json.loads((d / "metrics.json").read_text()))
            teacher = d / "adapter"
            if summary[-1].get("skipped"):  # the teacher is unchanged, so every later session would skip too
                break
        return {"sessions": summary, "final": str(teacher.relative_to(self.run.run_dir.path))}

    def _session(self, s: int, teacher: Path, gold: pa.Table) -> None:
        d, times = self.session_dir(s), {}
        pseudo_file = d / "pseudo.parquet"
        if not pseudo_file.is_file():
            t0 = time.perf_counter()
            write_parquet(pseudo_file, self._pseudo_label(read_adapter_state(teacher)))
            times["pseudo_label_s"] = time.perf_counter() - t0
        pseudo = read_parquet(pseudo_file)
        info = teacher_information(_probs(pseudo)) if pseudo.num_rows else None
        reason = self._skip_reason(pseudo, info)
        if reason:
            self._skip(s, teacher, pseudo, info, times, reason)
            return
        student = d / "student"
        if not (student / ADAPTER_FILE).is_file():
            t0 = time.perf_counter()
            result = self._train_student(s, pseudo, gold, student)
            write_json(d / "student_metrics.json", result.metrics)
            weights = json.loads((student / "pseudo_weights.json").read_text())
            write_parquet(pseudo_file, pseudo.append_column(
                "weight", pa.array([weights.get(e) for e in pseudo.column("example_id").to_pylist()], pa.float64())))
            times["student_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = self._gold_fine_tune(s, gold, read_adapter_state(student), d / "adapter.tmp")
        times["gold_s"] = time.perf_counter() - t0
        pseudo = read_parquet(pseudo_file)
        student_metrics = json.loads((d / "student_metrics.json").read_text())
        weights = [w for w in pseudo.column("weight").to_pylist() if w is not None]
        write_json(d / "metrics.json", {
            **_pseudo_summary(s, pseudo, info), "reweighted_rows": len(weights), "zero_weight_rows": sum(1 for w in weights if w == 0.0),
            "student_loss": student_metrics.get("epoch_loss", [None])[-1], "student_steps": student_metrics.get("steps"),
            "gold_loss": result.metrics.get("epoch_loss", [None])[-1], **{k: round(v, 3) for k, v in times.items()},
        })
        # The adapter dir last, by rename: its existence marks the session done (metrics.json is in place).
        os.replace(d / "adapter.tmp", d / "adapter")

    def _skip_reason(self, pseudo: pa.Table, info: Optional[float]) -> Optional[str]:
        """Why this session's teacher has nothing but the class prior to teach (None: it has more). Reads
        only the stored pseudo-labels, so a resumed session decides as the killed one did."""
        st = self.cfg.self_training
        if pseudo.num_rows == 0:
            return None  # _train_student says why there is nothing to train on
        if st.skip_one_class and pc.count_distinct(pseudo.column("pseudo_label")).as_py() == 1:
            label = pseudo.column("pseudo_label")[0].as_py()
            return f"all {pseudo.num_rows} pseudo-labels are {label!r}: the teacher has only the class prior to teach"
        if st.min_teacher_information is not None and info < st.min_teacher_information:
            k = len(pseudo.column("probs")[0])
            return (f"the teacher's pseudo-labels carry {info:.2%} of ln {k}, the most a label can tell about its row "
                    f"(self_training.min_teacher_information is {st.min_teacher_information:.2%}): its soft labels "
                    f"are nearly the same for every row (mean confidence {_mean_confidence(pseudo):.2f})")
        return None

    def _skip(self, s: int, teacher: Path, pseudo: pa.Table, info: float, times: dict, reason: str) -> None:
        """The teacher has nothing but the class prior to distil (_skip_reason). The session's adapter is
        the teacher itself; no student is trained."""
        d = self.session_dir(s)
        log.info("round %d, self-training session %d skipped: %s", self.k, s, reason)
        write_json(d / "metrics.json", {**_pseudo_summary(s, pseudo, info), "skipped": reason, "reweighted_rows": 0,
                                        "zero_weight_rows": 0, "student_loss": None, "student_steps": 0,
                                        "gold_loss": None, **{k: round(v, 3) for k, v in times.items()}})
        install_dir(str(teacher), d / "adapter")  # last, atomically: its existence marks the session done

    def _pseudo_label(self, teacher_state: dict) -> pa.Table:
        """The teacher's label-word distribution on every unlabelled row (eval mode, label-free)."""
        scorer = self.run.scorer
        scorer.set_adapter(teacher_state)
        scored = scorer.score(self.run.pool.scoring_input(rows=self.run._unlabeled()), "eval",
                              columns=["probs", "confidence", "prediction"])
        conf = scored.column("confidence")
        min_conf = self.cfg.self_training.min_confidence
        if min_conf is not None:
            scored = scored.filter(pc.greater_equal(conf, min_conf))
        return pa.table({
            "example_id": scored.column("example_id"),
            "source": pa.array(["pseudo"] * scored.num_rows, pa.string()),
            "probs": scored.column("probs"),
            "confidence": scored.column("confidence"),
            "pseudo_label": scored.column("prediction"),
        })

    def _train_student(self, s: int, pseudo: pa.Table, gold: pa.Table, out: Path) -> TrainResult:
        if pseudo.num_rows == 0:
            raise ValueError(f"round {self.k} session {s}: no pseudo-labelled rows (pool exhausted, or "
                             f"self_training.min_confidence {self.cfg.self_training.min_confidence} filtered all)")
        rows = pa.table({"example_id": pseudo.column("example_id"),
                         "prompt": self.run.pool.rows(pseudo.column("example_id"), ["prompt"]).column("prompt"),
                         "probs": pseudo.column("probs")})
        seed = session_seed(self.cfg.seed, self.k, s, "student")
        words = list(self.run.task.label_words)
        if self.cfg.train.backend == "local":
            from actors.self_training import train_student_in_process

            loop = student_loop_config(self.cfg, self.run.model_path, None, seed, words)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                metrics = train_student_in_process(loop, rows.to_pylist(), gold.to_pylist(), tmp)
                install_dir(tmp, out)
            metrics["fit_s"] = time.perf_counter() - t0
            return TrainResult(out, read_adapter_state(out), metrics)
        plan = self.run.scorer.plan
        loop = student_loop_config(self.cfg, self.run.model_path, plan.threads_per_train_worker, seed, words)
        return fit_with_ray_train(self.cfg, loop, {"train": rows, "gold": gold}, out, plan,
                                  str(self.run.run_dir.path / "ray_train"), f"round-{self.k}-student-{s}")

    def _gold_fine_tune(self, s: int, gold: pa.Table, student_state: dict, out: Path) -> TrainResult:
        cfg = dataclasses.replace(self.cfg, seed=session_seed(self.cfg.seed, self.k, s, "gold"))
        if cfg.train.backend == "local":
            return train_adapter_in_process(cfg, self.run.model_path, gold, out, False, student_state)
        return train_adapter(cfg, self.run.model_path, gold, out, self.run.scorer.plan, False, student_state,
                             storage_path=str(self.run.run_dir.path / "ray_train"), name=f"round-{self.k}-gold-{s}")


def teacher_information(probs: np.ndarray) -> float:
    """How much a teacher's soft labels say about their rows: the mutual information between row and label,
    I = H(mean p) - mean H(p), over ln K, in [0, 1]. 0: every row gets the same distribution (the class
    prior, however sure); 1: every row gets a sure answer and the answers are balanced."""
    p = np.asarray(probs, dtype=np.float64)
    sums = p.sum(axis=1, keepdims=True)
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(sums <= 0):
        bad = int(np.sum(~(np.isfinite(p).all(axis=1) & (p >= 0).all(axis=1) & (sums[:, 0] > 0))))
        raise ValueError(f"{bad} of the teacher's {len(p)} pseudo-label distributions are not probabilities (NaN, "
                         f"inf, negative or all zero): the teacher adapter is broken")
    p = p / sums

    def entropy(q: np.ndarray) -> np.ndarray:
        return -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0), axis=-1)

    return max(0.0, float(entropy(p.mean(axis=0)) - entropy(p).mean()) / np.log(p.shape[1]))


def _probs(pseudo: pa.Table) -> np.ndarray:
    column = pseudo.column("probs").combine_chunks()
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).reshape(len(column), -1)


def _mean_confidence(pseudo: pa.Table) -> float:
    return float(np.mean(pseudo.column("confidence").to_numpy()))


def _pseudo_summary(s: int, pseudo: pa.Table, info: Optional[float]) -> dict:
    """A session's pseudo-labels in its metrics.json: how many, per class, the teacher's mean confidence
    and `info`, the information its soft labels carry (teacher_information)."""
    labels = pseudo.column("pseudo_label").to_pylist()
    return {"session": s, "pseudo_rows": pseudo.num_rows,
            "pseudo_labels": {str(l): int(c) for l, c in zip(*np.unique(labels, return_counts=True))} if labels else {},
            "mean_confidence": _mean_confidence(pseudo) if labels else None,
            "teacher_information": info}
