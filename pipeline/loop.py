"""The active-learning loop. Each round k: score -> select -> label -> train -> evaluate.

Round 0 is the cold start: b0 examples chosen at random (seeded) or by base-model uncertainty. Every
phase reads its inputs from the run directory and writes its outputs there atomically before the
phase in state.json moves on, so a run killed anywhere resumes where it was and ends the same.

    run = ActiveLearningRun(cfg, "runs/demo"); run.run()        # or ActiveLearningRun.open(dir).resume()
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster.runtime import machine
from pipeline.config import Config, ConfigError, resume_config, resume_hint
from pipeline.data import DataError, Pool, eval_split_from_config, pool_from_config
from pipeline.evaluation import evaluate
from pipeline.io import (BATCH_ROWS, atomic, iter_batches, iter_rows_at, read_floats, read_parquet, release_arrow_memory,
                         take_rows, write_json, write_parquet)
from pipeline.oracles import SimulatedOracle, export_to_label, imported_labels
from pipeline.preflight import DATA_SEED, check_model, preflight
from pipeline.report import one_answer
from pipeline.run_dir import PHASES, RunDir, RunState
from pipeline.scoring import base_uncertainty, holds_exactly
from pipeline.strategies import MEASURE_COLUMNS, RoundScores, get_strategy, measure_column, top_positions
from pipeline.tasks import get_task
from pipeline.uncertainty import LambdaSchedule

log = logging.getLogger(__name__)


class NeedsLabels(Exception):
    """The human oracle is waiting: the run stopped cleanly in the labeling phase."""


class ActiveLearningRun:
    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        hook: Optional[Callable[[int, str, str], None]] = None,
        scorer=None,
        base_cache: Optional[Path] = None,
        echo: Optional[Callable[[str], None]] = None,
        say_logs: bool = True,
    ):
        """`hook(round, phase, "before"|"after")` runs around every phase (tests use it to kill a run).
        `scorer`: an existing PoolScorer to use (and leave running); by default the run starts its own.
        `base_cache`: a base-model score file shared by several runs (`deft compare`): the frozen base
        model's outputs depend on the prompt alone, so rows another run scored are not scored again.
        `echo`: where the one-line summary of each round goes (the CLI prints it); `say_logs`: start by
        echoing where the logs are (RUN/logs/driver.log, and Ray's worker logs)."""
        self.cfg, self.run_dir, self.hook = cfg, RunDir(run_dir), hook or (lambda k, phase, when: None)
        self.task = get_task(cfg.task)
        self.strategy = get_strategy(cfg.al.strategy, self.task.kind, cfg.al.measure, self._schedule())
        # What u_base measures: the strategy's own measure; for random, al.measure (used by a base cold start).
        self.base_measure = self.strategy.measure or measure_column(self.task.kind, cfg.al.measure)
        self.base_cache = Path(base_cache) if base_cache is not None else None
        self._pool = self._test = self._model_path = None
        self._scorer, self._own_scorer = scorer, scorer is None
        self._changed = False  # open(..., overrides) changed the frozen config; resume() records it
        self.echo, self.say_logs = echo or (lambda line: None), say_logs

    @classmethod
    def open(cls, run_dir: str | Path, overrides: Optional[list[str]] = None, **kw) -> "ActiveLearningRun":
        """The run in `run_dir`, with its frozen config. `overrides` (key=value) may change only what is safe
        to change mid-run (paths, cluster, scoring batch size: RESUME_KEYS); resume() then records them."""
        cfg = RunDir(run_dir).read_config()
        run = cls(resume_config(cfg, overrides) if overrides else cfg, run_dir, **kw)
        run._changed = bool(overrides)
        return run

    # ---- public API ------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Start a new run in a new (or empty) directory and carry it to the end. Everything that can be
        checked is checked before the directory exists: a run that fails to start leaves nothing behind."""
        self.run_dir.refuse_existing()
        self.check()
        self.run_dir.create(self.cfg)
        return self._drive()

    def resume(self) -> list[dict]:
        """Continue from the phase recorded in state.json, after the same checks as a new run."""
        done = self.run_dir.read_state().phase == "done"  # also a clear error for a path that is not a run
        try:
            self.check(start_scorers=not done)
            self._check_labels_in_pool()
        except (ConfigError, DataError) as e:
            raise type(e)(f"{e}\n{resume_hint(e, self.run_dir.path)}") from None
        self.run_dir.lock()
        if self._changed:
            self.run_dir.write_config(self.cfg)
        return self._drive()

    def check(self, start_scorers: bool = True) -> None:
        """Validate, then create: load the pool and the test split, check the model and its label words,
        and start the scorers (their resource plan is checked against the cluster first). Raises
        ConfigError or DataError naming the key or file; writes nothing."""
        checked = preflight(self.cfg, self.task, need_labels=self.cfg.al.oracle == "simulated",
                            cluster=self._scorer is None)
        self._pool, self._test, self._model_path = checked.pool, checked.test, checked.model_path
        if start_scorers:  # a model that loads on the driver but not in an actor fails here, before the run exists
            self.scorer

    @property
    def metrics(self) -> list[dict]:
        return self.run_dir.read_metrics()

    @property
    def state(self) -> RunState:
        return self.run_dir.read_state()

    def close(self) -> None:
        if self._scorer is not None and self._own_scorer:
            self._scorer.shutdown()
            self._scorer = None
        self.run_dir.unlock()

    # ---- the loop --------------------------------------------------------------------------------------
    def _drive(self) -> list[dict]:
        log_file = self._log_to_file()
        try:
            state = self.run_dir.read_state()
            while state.phase != "done":
                k, phase = state.round, state.phase
                self.hook(k, phase, "before")
                log.info("round %d: %s", k, phase)
                t0 = time.perf_counter()
                getattr(self, f"_{phase}")(k)
                release_arrow_memory()  # what a phase's large reads left with Arrow's allocator
                self._timing(k, phase, time.perf_counter() - t0)
                self.hook(k, phase, "after")
                state = self._advance(state)
                self.run_dir.write_state(state)
                if phase == "evaluating":
                    self.echo(round_summary(self.run_dir, k))
            return self.metrics
        finally:
            self.close()
            root = logging.getLogger()
            root.removeHandler(log_file)
            root.setLevel(log_file.root_level)
            log_file.close()

    def _log_to_file(self) -> logging.Handler:
        """Every log line of the driver goes to RUN/logs/driver.log (the console shows warnings only,
        unless -v). Ray's worker logs stay where Ray keeps them."""
        from cluster.runtime import logs_dir

        path = self.run_dir.path / "logs" / "driver.log"
        path.parent.mkdir(exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        handler.root_level = root.level  # restored when the run ends
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)  # console handlers keep their own level (pipeline.cli: warnings only)
        if self.say_logs:
            self.echo(f"logs: {path}" + (f"; Ray's worker logs: {logs_dir()}" if logs_dir() else ""))
        return handler

    def _advance(self, state: RunState) -> RunState:
        k, phase = state.round, state.phase
        history = state.history + [[k, phase]]
        if phase != "evaluating":
            return RunState(k, PHASES[PHASES.index(phase) + 1], history)
        return RunState(k, "done", history) if self._finished(k) else RunState(k + 1, "scoring", history)

    def _finished(self, k: int) -> bool:
        labels = self.run_dir.read_labeled().num_rows
        budget = self.cfg.al.budget
        return k + 1 >= self.cfg.al.rounds or (budget is not None and labels >= budget) or labels >= len(self.pool)

    # ---- phases ----------------------------------------------------------------------------------------
    def _scoring(self, k: int) -> None:
        rows = self._candidates(k, self._unlabeled())  # positions in the pool, ascending
        if k == 0 and self.cfg.al.evaluate_base and self.test is not None:
            write_json(self.run_dir.path / "base_eval.json", self._evaluate_adapter(None))
        n = len(rows)
        u_base = u_lora = base = lora = shown_base = None
        cold_by_base = k == 0 and self.cfg.al.initial == "base_uncertainty"
        if self.strategy.uses_base or cold_by_base:  # scored once, in round 0, and cached
            whole = self.cfg.al.base_on_full_pool or self.cfg.al.candidates is None
            shown = k == 0 or not self.strategy.uses_lora  # base's answers go to scores.parquet (no lora this round)
            asked = self.pool.scoring_input(rows=None if whole else rows)
            cache = self.run_dir.base_uncertainty_file
            base = base_uncertainty(self.scorer, asked, cache, self.base_cache, columns=[self.base_measure])
            # in the asked order: positions place the rows from here; the whole pool's (in pool order) are
            # cut to the rows' own
            whole_pool = base.num_rows != n
            u_base = _floats(base, self.base_measure, rows if whole_pool else None)
            base = None
            if shown and holds_exactly(cache, asked.example_ids):
                # base's answers are streamed from the cache as scores.parquet is written (~170 MB at 10M rows)
                shown_base = iter_rows_at(cache, rows if whole_pool else np.arange(n), ["prediction", "confidence"], BATCH_ROWS)
            elif shown:  # the cache's rows are in another order (`deft compare` filled it from the shared file)
                base = base_uncertainty(self.scorer, asked, cache, self.base_cache, columns=["prediction", "confidence"])
                base = base.take(pa.array(rows, pa.int64())) if whole_pool else base
            release_arrow_memory()
        if k == 0:  # cold start: no adapter has been trained yet
            score = u_base if cold_by_base else self._rng(k, "cold").random(n)
        else:
            if self.strategy.uses_lora:  # adapter k-1, trained on rounds 0..k-1, scores round k
                self.scorer.set_adapter(self._adapter_state(k - 1))
                # Every column to a file, then one back to the driver: at 10M rows the others would be ~1 GB.
                lora = LoraScores(self.scorer.score_to_file(self.pool.scoring_input(rows=rows), "lora",
                                                            self.run_dir.round_dir(k) / LORA_SCRATCH, seed=self.cfg.seed))
                u_lora = lora.floats(self.strategy.measure)
            score = self.strategy.acquisition(RoundScores(n, u_base, u_lora, adapter=k - 1), self._rng(k, "strategy"))
        if lora is None:
            # The newest model's own answer and confidence, shown to annotators beside each row (label
            # export); null where this round scored nothing (random, the cold start).
            # Written a batch at a time: a pool-sized table (its all-null columns are allocated too) and
            # the writer's buffers for it were ~130 MB at 10M rows.
            schema = pa.schema([("example_id", pa.string()), ("u_lora", pa.float64()), ("u_base", pa.float64()),
                                ("score", pa.float64()), ("prediction", pa.string()), ("confidence", pa.float64())])

            def write(tmp: str) -> None:
                with pq.ParquetWriter(tmp, schema) as writer:
                    for start in range(0, n, BATCH_ROWS):
                        at = slice(start, start + BATCH_ROWS)
                        m = len(rows[at])
                        part = next(shown_base) if shown_base is not None else base.slice(start, m) if base is not None else None
                        writer.write_table(pa.table({
                            "example_id": self.pool.ids.take(pa.array(rows[at], pa.int64())),
                            "u_lora": pa.nulls(m, pa.float64()),
                            "u_base": pa.array(u_base[at], pa.float64()) if u_base is not None else pa.nulls(m, pa.float64()),
                            "score": pa.array(score[at], pa.float64()),
                            "prediction": _column(part, m, "prediction", pa.string()),
                            "confidence": _column(part, m, "confidence", pa.float64()),
                        }, schema=schema))

            atomic(self.run_dir.scores_file(k), write)
            return
        measures = sorted(set(MEASURE_COLUMNS[self.task.kind].values()))
        lora.write_scores(self.run_dir.scores_file(k), self.strategy.measure, measures, u_base, score)
        lora.path.unlink()

    def _selecting(self, k: int) -> None:
        (self.run_dir.round_dir(k) / LORA_SCRATCH).unlink(missing_ok=True)  # a kill after scores.parquet leaves it
        b = self.cfg.al.initial_size if k == 0 else self.cfg.al.batch_size
        if self.cfg.al.budget is not None:
            b = min(b, self.cfg.al.budget - self.run_dir.read_labeled().num_rows)
        # The score column alone, then the ids of the b picked rows: at 10M rows the whole file is ~1 GB.
        path = self.run_dir.scores_file(k)
        score = read_floats(path, "score")
        top = top_positions(score, b, self._rng(k, "ties"))
        write_parquet(self.run_dir.selected_file(k), pa.table({
            "example_id": take_rows(path, top, ["example_id"]).column("example_id").cast(pa.string()),
            "rank": pa.array(np.arange(len(top)), pa.int64()),
            "score": pa.array(score[top], pa.float64()),
        }))

    def _labeling(self, k: int) -> None:
        ids = read_parquet(self.run_dir.selected_file(k)).column("example_id").to_pylist()
        if self.cfg.al.oracle == "simulated":
            self.run_dir.add_labels(SimulatedOracle(self.pool).label(ids, k))
            return
        labels, partial_ok = imported_labels(self.run_dir, k)
        if len(labels) < len(ids) and not (partial_ok and labels):
            path = self.run_dir.to_label_file(k)
            if not path.is_file():
                path = export_to_label(self.run_dir, k, ids, self.pool)
            raise NeedsLabels(
                f"round {k}: {len(ids) - len(labels)} of {len(ids)} examples need labels. Fill the \"label\" "
                f"fields of {path} (or label them in Label Studio or Argilla: deft label export {self.run_dir.path} "
                f"--format label-studio|argilla), then run:\n  deft label import {self.run_dir.path} {path}\n  deft resume {self.run_dir.path}"
            )
        self.run_dir.add_labels(pa.Table.from_pylist(
            [{"example_id": e, "label": labels[e], "round_added": k, "source": "human"} for e in ids if e in labels]))

    def _training(self, k: int) -> None:
        """Constraint-LoRA training on the gold labels; with self_training.enabled that adapter is the
        teacher of LiST sessions (pipeline.self_training) and the round's adapter is the last student."""
        table = self.training_table()
        if not self.cfg.self_training.enabled:
            self._train_gold(k, table, self.run_dir.adapter_dir(k))
            return
        from pipeline.self_training import RoundSelfTraining
        from pipeline.training import ADAPTER_FILE, install_dir

        st = RoundSelfTraining(self, k)
        if not (st.teacher_dir() / ADAPTER_FILE).is_file():  # resumed: the teacher is already trained
            self._train_gold(k, table, st.teacher_dir())
        summary = st.run_sessions(table)
        install_dir(str(self.run_dir.path / summary["final"]), self.run_dir.adapter_dir(k))
        path = self.run_dir.round_dir(k) / "train_metrics.json"
        write_json(path, {**_read_json(path), "self_training": summary})

    def _train_gold(self, k: int, table: pa.Table, out: Path) -> None:
        from pipeline.training import train_adapter, train_adapter_in_process

        init = self._adapter_state(k - 1) if self.cfg.train.warm_start and k > 0 else None
        add_eos = self.task.kind == "generation"
        if self.cfg.train.backend == "local":
            result = train_adapter_in_process(self.cfg, self.model_path, table, out, add_eos, init)
        else:
            result = train_adapter(self.cfg, self.model_path, table, out, self.scorer.plan, add_eos, init,
                                   storage_path=str(self.run_dir.path / "ray_train"), name=f"round-{k}")
        write_json(self.run_dir.round_dir(k) / "train_metrics.json", result.metrics)

    def _evaluating(self, k: int) -> None:
        result = self._evaluate_adapter(k) if self.test is not None else {}
        selected = read_parquet(self.run_dir.selected_file(k))
        labeled = self.run_dir.read_labeled()
        new = labeled.filter(pc.equal(labeled.column("round_added"), k)).column("label").to_pylist()
        train = _read_json(self.run_dir.round_dir(k) / "train_metrics.json")
        line = {
            "round": k,
            "labels": labeled.num_rows,
            "strategy": self.cfg.al.strategy,
            "lambda": self.strategy.weight(k - 1) if k > 0 else None,  # the λ that selected this round's batch
            **result,
            "selected": {"n": selected.num_rows, "mean_score": _mean(selected.column("score").to_pylist()),
                         "labels": {l: new.count(l) for l in sorted(set(new))}},
            "train_loss": train.get("epoch_loss", [None])[-1],
            **({"self_training": _self_training_line(train["self_training"])} if "self_training" in train else {}),
            "timings": {**_read_json(self.run_dir.round_dir(k) / "timings.json"),
                        "train_fit_s": train.get("fit_s"), "train_overhead_s": train.get("overhead_s")},
            "machine": machine(),
        }
        self.run_dir.put_metrics(line)

    # ---- helpers ---------------------------------------------------------------------------------------
    def _check_labels_in_pool(self) -> None:
        """A resumed run's labelled examples must all still be in the pool (data.path may have moved)."""
        if not self.run_dir.labeled_file.is_file():
            return
        have = self.run_dir.read_labeled().column("example_id")
        # one pass over the pool against the (few) labelled ids: the pool's ids as a value_set would hash them all
        present = self.pool.ids.filter(pc.is_in(self.pool.ids, value_set=have.combine_chunks()))
        lost = pc.filter(have, pc.invert(pc.is_in(have, value_set=present))).to_pylist()
        if lost:
            raise DataError(f"data.path: {self.cfg.data.path} lacks {len(lost)} of this run's labelled examples "
                            f"(e.g. {sorted(lost)[:3]}); a resumed run needs the pool it started with")

    def _evaluate_adapter(self, k: Optional[int]) -> dict:
        """Accuracy and ECE on the test split; k=None evaluates the base model (adapter disabled)."""
        t0 = time.perf_counter()
        if k is None:  # the frozen base model: shareable between runs, like u_base
            scored = base_uncertainty(self.scorer, self.test.scoring_input(), None, self.base_cache)
        else:
            self.scorer.set_adapter(self._adapter_state(k))
            scored = self.scorer.score(self.test.scoring_input(), "eval")
        ids = scored.column("example_id")
        labels = dict(zip(ids.to_pylist(), self.test.rows(ids, ["label"]).column("label").to_pylist()))
        return {**evaluate(scored, labels, self.task, self.cfg.al.ece_bins), "eval_s": time.perf_counter() - t0}

    def _adapter_state(self, k: int) -> dict:
        from pipeline.training import read_adapter_state

        return read_adapter_state(self.run_dir.adapter_dir(k))

    def training_table(self) -> pa.Table:
        """Labelled rows joined with their prompts. Oracle labels train on the pool's target text; a human's
        label becomes the target the task builds from it."""
        labeled = self.run_dir.read_labeled()
        pool = self.pool.rows(labeled.column("example_id"), ["prompt", "target"]).to_pylist()
        rows = [{"example_id": r["example_id"], "prompt": p["prompt"],
                 "target": p["target"] if r["source"] == "oracle" else self.task.target(r["label"], r["label"])}
                for r, p in zip(labeled.to_pylist(), pool)]
        return pa.Table.from_pylist(rows)

    def _candidates(self, k: int, unlabeled: np.ndarray) -> np.ndarray:
        """al.candidates: a seeded random subset of the unlabelled rows (positions, ascending), a fresh one
        each round; the whole of them without it, or when fewer remain."""
        n = self.cfg.al.candidates
        if n is None or len(unlabeled) <= n:
            return unlabeled
        return unlabeled[np.sort(self._rng(k, "candidates").choice(len(unlabeled), size=n, replace=False))]

    def _unlabeled(self) -> np.ndarray:
        """The pool positions of the unlabelled rows, ascending (positions only: ids and prompts stay put)."""
        return self.pool.rows_without(self.run_dir.read_labeled().column("example_id"))

    def _rng(self, k: int, purpose: str) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, k, sum(purpose.encode())])

    def _schedule(self) -> LambdaSchedule:
        al = self.cfg.al
        return LambdaSchedule(al.lambda_start, al.lambda_step, al.lambda_max, tuple(al.lambda_values))

    def _timing(self, k: int, phase: str, seconds: float) -> None:
        path = self.run_dir.round_dir(k) / "timings.json"
        write_json(path, {**_read_json(path), f"{phase}_s": round(seconds, 3)})

    # ---- lazily built resources ------------------------------------------------------------------------
    @property
    def pool(self) -> Pool:
        if self._pool is None:
            self._pool = pool_from_config(self.cfg.data, self.task, DATA_SEED, require_label=self.cfg.al.oracle == "simulated")
        return self._pool

    @property
    def test(self) -> Optional[Pool]:
        if self._test is None:
            self._test = eval_split_from_config(self.cfg.data, self.task, DATA_SEED, self.cfg.al.eval_limit)
        return self._test

    @property
    def model_path(self) -> str:
        if self._model_path is None:
            self._model_path = check_model(self.cfg.model)
        return self._model_path

    @property
    def scorer(self):
        if self._scorer is None:
            from cluster.runtime import connect
            from pipeline.scoring import PoolScorer

            c = self.cfg.cluster
            connect(c.address, c.num_cpus, c.temp_dir)
            self._scorer = PoolScorer(self.cfg, self.model_path)
        return self._scorer


def round_summary(run_dir: RunDir, k: int) -> str:
    """One line for round k: labels, accuracy, ECE and where the time went."""
    line = next((m for m in run_dir.read_metrics() if m["round"] == k), {})
    acc = f"accuracy {line['accuracy']:.3f}, ECE {line['ece']:.3f}" if line.get("accuracy") is not None else "not evaluated"
    if (answer := one_answer(line)) is not None:  # the class prior, not learning: say so where it is seen
        acc += f", the same answer ({answer!r}) for every test row"
    t = _read_json(run_dir.round_dir(k) / "timings.json")
    times = ", ".join(f"{p} {t[f'{p}_s']:.0f}s" for p in ("scoring", "training", "evaluating") if t.get(f"{p}_s") is not None)
    st = line.get("self_training")
    if st:  # LiST: how many sessions ran, and how many were skipped for a teacher with only the prior to teach
        skipped = f", {st['skipped_sessions']} skipped" if st.get("skipped_sessions") else ""
        times += f"; self-training {st['sessions']} session{'s' if st['sessions'] != 1 else ''}{skipped} in {st['seconds']:.0f}s"
    return f"round {k}: {line.get('labels', '?')} labels, {acc} ({times})"


LORA_SCRATCH = ".lora_scores.parquet"  # a round's every lora column, until scores.parquet is written from it


class LoraScores:
    """A round's u_lora file (every column, in the asked rows' order, never whole in the driver)."""

    def __init__(self, path: Path):
        self.path = path

    def floats(self, column: str) -> np.ndarray:
        """One column, in the asked rows' order."""
        return read_floats(self.path, column)

    def write_scores(self, dest: Path, measure: str, measures: list[str], u_base: Optional[np.ndarray],
                     score: np.ndarray) -> None:
        """The round's scores.parquet, in the file's row order, a batch at a time: each row's u_lora (the
        strategy's measure), u_base and acquisition score, every lora measure, and the adapter's answer
        and confidence (shown to annotators beside each row)."""
        schema = pa.schema([("example_id", pa.string()), ("u_lora", pa.float64()), ("u_base", pa.float64()),
                            ("score", pa.float64()), *[(f"lora_{c}", pa.float64()) for c in measures],
                            ("prediction", pa.string()), ("confidence", pa.float64())])

        def write(tmp: str) -> None:
            with pq.ParquetWriter(tmp, schema) as writer:
                start = 0
                for batch in iter_batches(self.path, 65_536, ["example_id", *measures, "prediction", "confidence"]):
                    at = slice(start, start + batch.num_rows)
                    start += batch.num_rows
                    writer.write_table(pa.table({
                        "example_id": batch.column("example_id"),
                        "u_lora": batch.column(measure),
                        "u_base": pa.array(u_base[at] if u_base is not None else [None] * batch.num_rows, pa.float64()),
                        "score": pa.array(score[at], pa.float64()),
                        **{f"lora_{c}": batch.column(c) for c in measures},
                        "prediction": batch.column("prediction"),
                        "confidence": batch.column("confidence"),
                    }).cast(schema))

        atomic(dest, write)


def _column(scored: Optional[pa.Table], n: int, column: str, type: pa.DataType) -> pa.ChunkedArray:
    """`scored[column]` as `type` (all n null if nothing was scored), its chunks kept: no copy of a large pool's."""
    if scored is None:
        return pa.chunked_array([pa.nulls(n, type)])
    return scored.column(column).cast(type)


def _floats(scored: pa.Table, column: str, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """`scored[column]` as a writable float64 array, cut to positions `rows` if given (one copy either way)."""
    values = _column(scored, scored.num_rows, column, pa.float64()).to_numpy()
    return values[rows] if rows is not None else np.array(values)


def _self_training_line(summary: dict) -> dict:
    """The round's self-training in one metrics line: per session, pseudo rows and losses; the total time."""
    sessions = summary["sessions"]
    return {
        "sessions": len(sessions),
        "pseudo_rows": [s["pseudo_rows"] for s in sessions],
        "student_loss": [s["student_loss"] for s in sessions],
        "gold_loss": [s["gold_loss"] for s in sessions],
        "zero_weight_rows": [s["zero_weight_rows"] for s in sessions],
        "teacher_information": [s.get("teacher_information") for s in sessions],
        "skipped_sessions": sum(1 for s in sessions if s.get("skipped")),  # pipeline.self_training._skip_reason
        "seconds": round(sum(s.get(k, 0.0) for s in sessions for k in ("pseudo_label_s", "student_s", "gold_s")), 3),
    }


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
