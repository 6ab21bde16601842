"""Driver side of pool scoring: long-lived scoring actors, Ray Data sharding, exactly-once results.

Ray is imported inside the functions so that the rest of `pipeline` stays importable and testable
without it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from pipeline.config import Config, to_dict
from pipeline.data import SCORER_COLUMNS
from pipeline.io import read_parquet, write_parquet

log = logging.getLogger(__name__)


PROGRESS_STEPS = 4  # shards per actor per call: progress granularity; the blocks themselves do not change
# A scorer that dies (OOM killer, a lost node) is restarted by Ray up to this many times per actor, and its
# shards are scored again; a score is a pure function of (block, mode, seed, adapter), so the result is
# the same as if it had never died.
MAX_RESTARTS = 3
START_TIMEOUT_S = 30.0  # scorers still unplaced after this long, for want of resources, are an error


class ScoringError(RuntimeError):
    pass


def length_sorted_blocks(table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    """Sort by prompt length (then id, for a fixed order) and cut into blocks of one micro-batch each.

    Sorting makes each batch pad only to its own longest prompt. Fixed blocks make a row's batch-mates,
    and so its dropout masks, the same whichever actor scores it. Longest first: actors pull blocks as
    they free up, so the short blocks at the end even out the finish.
    """
    lengths = pc.utf8_length(table.column("prompt"))
    table = table.append_column("_len", lengths).sort_by([("_len", "descending"), ("example_id", "ascending")])
    table = table.drop_columns(["_len"])
    return [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]


def deal_blocks(blocks: list[pa.Table], n: int) -> list[list[pa.Table]]:
    """Deal length-sorted blocks to n actors in snake order (0,1,..,n-1,n-1,..,0,0,..), so every actor gets
    a near-equal share of long and short blocks."""
    hands: list[list[pa.Table]] = [[] for _ in range(n)]
    for i, block in enumerate(blocks):
        turn, pos = divmod(i, n)
        hands[pos if turn % 2 == 0 else n - 1 - pos].append(block)
    return hands


def check_exactly_once(expected: list[str], got: pa.Table) -> None:
    """Raise unless `got` has exactly one row per expected example_id."""
    ids = got.column("example_id").to_pylist()
    dupes = len(ids) - len(set(ids))
    missing = set(expected) - set(ids)
    extra = set(ids) - set(expected)
    if dupes or missing or extra:
        raise ScoringError(
            f"scoring lost or duplicated rows: {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
            f"{dupes} duplicated, {len(extra)} unexpected"
        )


def in_order(table: pa.Table, example_ids: list[str]) -> pa.Table:
    """Reorder `table` to follow `example_ids`."""
    index = {e: i for i, e in enumerate(table.column("example_id").to_pylist())}
    return table.take(pa.array([index[e] for e in example_ids], pa.int64()))


class PoolScorer:
    """N long-lived scoring actors. The base model loads once per actor for the whole run; each round
    only the adapter (a few MB) travels, through the object store."""

    def __init__(self, cfg: Config, model_path: str, plan=None):
        import ray

        from actors.scorer import Scorer
        from cluster.plan import plan_resources

        self.cfg = cfg
        self.plan = plan or plan_resources(ray.cluster_resources(), cfg.scoring.num_actors, cfg.cluster.scorer_cpus,
                                           train_workers=cfg.train.num_workers)
        self._remote = ray.remote(Scorer).options(num_cpus=self.plan.scorer_cpus, num_gpus=self.plan.scorer_gpus,
                                                  max_restarts=MAX_RESTARTS)
        self._kwargs = dict(
            model_path=model_path,
            model=to_dict(cfg.model),
            lora=to_dict(cfg.lora),
            task=to_dict(cfg.task),
            scoring=to_dict(cfg.scoring),
            num_threads=self.plan.threads_per_scorer,
            seed=cfg.seed,
        )
        t0 = time.perf_counter()
        self._adapter = None  # the object-store reference of the current adapter, for restarted actors
        self.deaths = 0  # shards scored again because their actor died
        self.actors = [self._remote.remote(**self._kwargs) for _ in range(self.plan.num_scorers)]
        self._wait_started()  # waits for every model to load, so a load error surfaces here
        log.info("%s ready in %.1fs", self.plan.describe(), time.perf_counter() - t0)

    def _wait_started(self) -> None:
        """Wait for every scorer to load its model. Scorers Ray cannot place (the resources they ask for are
        held elsewhere) are an error after START_TIMEOUT_S instead of a wait without end."""
        import ray

        pending = [a.info.remote() for a in self.actors]
        deadline = time.monotonic() + START_TIMEOUT_S
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=5.0)
            ray.get(done)
            if pending and time.monotonic() > deadline and not self._placeable():
                raise ScoringError(
                    f"{len(pending)} of {len(self.actors)} scorers could not be placed in {START_TIMEOUT_S:.0f} s: each asks "
                    f"for {self.plan.scorer_cpus:g} CPU and {self.plan.scorer_gpus:g} GPU; the cluster has "
                    f"{ray.available_resources()} free of {ray.cluster_resources()}")

    def _placeable(self) -> bool:
        """Whether the free resources could hold one more scorer (then a slow start is a slow model load)."""
        import ray

        free = ray.available_resources()
        return free.get("CPU", 0) >= self.plan.scorer_cpus and free.get("GPU", 0) >= self.plan.scorer_gpus

    def info(self) -> list[dict]:
        import ray

        return ray.get([a.info.remote() for a in self.actors])

    def set_adapter(self, state: dict) -> int:
        """Put the adapter into the object store once; every actor swaps it in from the same reference."""
        import ray

        self._adapter = ray.put(state)
        versions = ray.get([a.set_adapter.remote(self._adapter) for a in self.actors])
        return versions[0]

    def _revive(self, i: int) -> None:
        """Make actor i usable again after it died: Ray restarts it (a fresh __init__, so the model loads
        again and the adapter is sent again); past its restarts, a new actor takes its place."""
        import ray
        from ray.exceptions import RayActorError

        for attempt in range(2):
            try:
                ray.get(self.actors[i].set_adapter.remote(self._adapter) if self._adapter is not None
                        else self.actors[i].info.remote())
                return
            except RayActorError:
                if attempt:
                    raise
                log.warning("scorer %d is gone for good; starting a new one", i)
                self.actors[i] = self._remote.remote(**self._kwargs)

    def score(self, table: pa.Table, mode: str, progress: bool = True, seed: Optional[int] = None,
              on_part: Optional[Callable[[int, int], None]] = None) -> pa.Table:
        """One row per example_id of `table` (example_id, prompt), in `table`'s order. `seed` seeds the MC
        dropout masks (default: the config's), so runs of several seeds can share these actors. A scorer
        that dies mid-call is revived and its shards scored again (exactly once in the result).
        `on_part(actor index, rows)` is called as each shard comes back."""
        import ray
        from ray.exceptions import RayActorError

        if table.column_names != SCORER_COLUMNS:
            raise ScoringError(f"scorers take exactly {SCORER_COLUMNS}, got {table.column_names}")
        if table.num_rows == 0:
            raise ScoringError("nothing to score: the pool is empty")
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # per-row progress bars cost CPU that the scorers need
        ctx.enable_auto_log_stats = False
        # A static split of fixed blocks: Ray Data's streaming_split would balance dynamically, but it starts
        # a coordinator actor (a new process) on every call and keeps it polling while the actors score.
        # Each actor's blocks go in a few sequential shards, so the driver can show progress as they finish.
        hands = deal_blocks(length_sorted_blocks(table, self.cfg.scoring.batch_size), len(self.actors))
        pieces = [(a, hand[i::PROGRESS_STEPS]) for a, hand in zip(self.actors, hands) for i in range(PROGRESS_STEPS)]
        pieces = [(a, blocks) for a, blocks in pieces if blocks]
        ds = ray.data.from_arrow([block for _, blocks in pieces for block in blocks])
        sizes = [sum(b.num_rows for b in blocks) for _, blocks in pieces]
        shards = ds.split_at_indices([sum(sizes[: i + 1]) for i in range(len(sizes) - 1)])
        seed = self.cfg.seed if seed is None else seed
        index = {id(a): i for i, a in enumerate(self.actors)}
        work = [(index[id(a)], shard, n) for (a, _), shard, n in zip(pieces, shards, sizes)]
        refs = {self.actors[i].score_shard.remote(shard, mode, seed): (i, shard, n) for i, shard, n in work}
        parts, pending, deaths = [], list(refs), 0
        with tqdm(total=table.num_rows, desc=f"scoring ({mode})", unit="row", disable=not progress, leave=False) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                i, shard, n = refs.pop(done[0])
                try:
                    parts.append(ray.get(done[0]))
                except RayActorError as e:  # the actor died mid-shard: score that shard again, on a revived actor
                    deaths += 1
                    self.deaths += 1
                    if deaths > MAX_RESTARTS * len(self.actors):
                        raise
                    log.warning("scorer %d died (%s); scoring its shard of %d rows again", i, type(e).__name__, n)
                    self._revive(i)
                    ref = self.actors[i].score_shard.remote(shard, mode, seed)
                    refs[ref] = (i, shard, n)
                    pending.append(ref)
                    continue
                bar.update(n)
                if on_part is not None:
                    on_part(i, n)
        result = pa.concat_tables([p for p in parts if p is not None], promote_options="default")
        ids = table.column("example_id").to_pylist()
        check_exactly_once(ids, result)
        return in_order(result, ids)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def _known(path: Optional[Path]) -> Optional[pa.Table]:
    return read_parquet(path) if path is not None and Path(path).is_file() else None


def _missing(table: pa.Table, known: Optional[pa.Table]) -> pa.Table:
    if known is None:
        return table
    return table.filter(pc.invert(pc.is_in(table.column("example_id"), value_set=known.column("example_id"))))


def _union(a: Optional[pa.Table], b: Optional[pa.Table]) -> Optional[pa.Table]:
    if a is None or b is None:
        return a if b is None else b
    return pa.concat_tables([a, _missing(b, a)], promote_options="default")


def base_uncertainty(scorer: PoolScorer, table: pa.Table, cache: Optional[Path] = None,
                     shared: Optional[Path] = None) -> pa.Table:
    """Base-model scores for every row of `table`, in its order: the frozen base never changes, so a row
    is scored once and cached.

    `cache` is the run's own file (base_uncertainty.parquet). `shared` is a file several runs share
    (`deft compare`): the base model's output for a row depends only on its prompt, so rows any run has
    scored are copied, not re-scored. Both are rewritten atomically; a lost race on `shared` only means a
    row is scored again later.
    """
    ids = table.column("example_id").to_pylist()
    own, common = _known(cache), _known(shared)
    known = _union(own, common)
    todo = _missing(table, known)
    fresh = scorer.score(todo, "base") if todo.num_rows else None
    known = _union(known, fresh)
    keep = known.filter(pc.is_in(known.column("example_id"), value_set=pa.array(ids, pa.string())))
    check_exactly_once(ids, keep)
    grown = _union(own, keep)  # rows this call needed that the run's own cache lacked (candidates differ per round)
    if cache is not None and (own is None or grown.num_rows > own.num_rows):
        write_parquet(cache, grown)
    if shared is not None and fresh is not None:
        write_parquet(shared, _union(_known(shared), fresh))
    return in_order(keep, ids)
