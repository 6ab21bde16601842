"""Driver side of pool scoring: long-lived scoring actors, work by reference, exactly-once results.

The driver never holds the prompts. It plans units of work from row positions and prompt lengths alone
(`plan_units`: row group, row offsets), the scorers read those rows of the pool's label-free inputs file
themselves, score them and write their scores as Parquet, and the driver reads the score columns back in
the order it asked for them. So the driver's memory and CPU per call grow with the rows, not with the text
(benchmarks.pool_scale, benchmarks.round_memory).

Ray is imported inside the functions so that the rest of `pipeline` stays importable and testable
without it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.config import Config, to_dict
from pipeline.data import SCORER_COLUMNS, ScoringInput, as_id_array, pools_dir, row_group_of, write_inputs
from pipeline.io import BATCH_ROWS, atomic, iter_batches, read_columns

log = logging.getLogger(__name__)


PROGRESS_STEPS = 4  # units per actor in a small call: progress and balance; the micro-batches do not change
# A scorer that dies (OOM killer, a lost node) is restarted by Ray up to this many times per actor, and its
# units are scored again; a score is a pure function of (micro-batch, mode, seed, adapter), so the result
# is the same as if it had never died.
MAX_RESTARTS = 3
UNITS_IN_FLIGHT = 2  # per actor: the next unit is queued on the actor before the current one ends
START_TIMEOUT_S = 30.0  # scorers still unplaced after this long, for want of resources, are an error


class ScoringError(RuntimeError):
    pass


def length_sorted_blocks(table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    """Sort by prompt length, longest first (ties keep the table's order), and cut into blocks of one
    micro-batch each: the blocks the scorers see for a table that fits one row group (`plan_units`).

    Sorting makes each batch pad only to its own longest prompt. Fixed blocks make a row's batch-mates,
    and so its dropout masks, the same whichever actor scores it.
    """
    lengths = pc.utf8_length(table.column("prompt")).to_numpy(zero_copy_only=False)
    table = table.take(pa.array(np.argsort(-lengths, kind="stable"), pa.int64()))
    return [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]


@dataclass(frozen=True)
class Unit:
    """One piece of work for a scorer: rows `offsets` (in this order) of row group `group` of the inputs
    file, scored in consecutive micro-batches of `batch_size`."""
    index: int
    group: int
    offsets: np.ndarray
    longest: int

    @property
    def rows(self) -> int:
        return len(self.offsets)


def plan_units(inp: ScoringInput, batch_size: int, n_actors: int, steps: int = PROGRESS_STEPS) -> list[Unit]:
    """Cut the rows of `inp` into micro-batches and the micro-batches into units, on positions and lengths alone.

    Within each row group the rows are sorted by prompt length, longest first (ties in file order), and cut
    into micro-batches of `batch_size`: a row's batch-mates, and so its MC dropout masks, depend on the
    rows being scored, never on which actor scores them or how many there are. A unit is up to a row
    group's worth of consecutive micro-batches, fewer when the call is small, so every actor gets about
    `steps` units (progress, balance). Units come longest first: actors pull them as they free up, so the
    short ones even out the finish. `inp`'s positions ascend, so each row group's rows are one slice of
    them, planned on its own: the driver's transient arrays are a row group's, not the pool's.
    """
    n = inp.num_rows
    if n == 0:
        return []
    micro = -(-n // batch_size)
    per_unit = int(min(max(1, -(-micro // (n_actors * steps))), max(1, inp.row_group_rows // batch_size)))
    unit_rows = batch_size * per_unit
    last_group = int(inp.positions[-1]) // inp.row_group_rows
    bounds = np.searchsorted(inp.positions, np.arange(last_group + 2) * inp.row_group_rows)
    units = []
    for group in np.flatnonzero(np.diff(bounds)):
        a, b = bounds[group], bounds[group + 1]
        offsets = row_group_of(inp.positions[a:b], inp.row_group_rows)[1].astype(np.int32)
        lengths = inp.n_chars[a:b]
        order = np.lexsort((offsets, -lengths.astype(np.int64)))
        offsets, lengths = offsets[order], lengths[order]
        units += [Unit(0, int(group), offsets[i:i + unit_rows], int(lengths[i])) for i in range(0, b - a, unit_rows)]
    units.sort(key=lambda u: -u.longest)
    return [dataclasses.replace(u, index=i) for i, u in enumerate(units)]


def in_order(table: pa.Table, example_ids) -> pa.Table:
    """The rows of `table` for `example_ids` (a list or an Arrow array), in that order: `table` itself when
    it already is, else one lookup (rows not asked for are left out; an id there twice gives its first
    row). An asked id that `table` lacks is a ScoringError."""
    ids = as_id_array(example_ids)
    if table.column("example_id").equals(pa.chunked_array([ids])):
        return table
    at = pc.index_in(ids, value_set=table.column("example_id"))
    if at.null_count:
        missing = pc.filter(ids, pc.is_null(at))
        raise ScoringError(f"scoring lost rows: {len(missing)} missing (e.g. {sorted(missing.to_pylist())[:3]})")
    return table.take(at)


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
        self._adapter_token = 0  # counts broadcasts; a unit names the adapter it needs (Scorer.score_unit)
        self.deaths = 0  # units scored again because their actor died
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
        self._adapter_token += 1
        versions = ray.get([a.set_adapter.remote(self._adapter, self._adapter_token) for a in self.actors])
        return versions[0]

    def _revive(self, i: int) -> None:
        """Make actor i usable again after it died: Ray restarts it (a fresh __init__, so the model loads
        again and the adapter is sent again); past its restarts, a new actor takes its place."""
        import ray
        from ray.exceptions import RayActorError

        for attempt in range(2):
            try:
                ray.get(self.actors[i].set_adapter.remote(self._adapter, self._adapter_token) if self._adapter is not None
                        else self.actors[i].info.remote())
                return
            except RayActorError:
                if attempt:
                    raise
                log.warning("scorer %d is gone for good; starting a new one", i)
                self.actors[i] = self._remote.remote(**self._kwargs)

    def score(self, inputs: ScoringInput | pa.Table, mode: str, progress: bool = True, seed: Optional[int] = None,
              on_part: Optional[Callable[[int, int], None]] = None, columns: Optional[list[str]] = None) -> pa.Table:
        """One row per example_id of `inputs`, in its order: a pool's rows by reference (`Pool.scoring_input`),
        which the scorers read from the pool's label-free inputs file themselves, or an in-memory table of
        exactly (example_id, prompt). `seed` seeds the MC dropout masks (default: the config's), so runs of
        several seeds can share these actors. Each scorer writes its scores as Parquet beside the inputs;
        the driver reads back `columns` (default all). A scorer that dies mid-call is revived and its units
        scored again (exactly once in the result). `on_part(actor index, rows)` is called as each unit
        comes back."""
        with self._scored(inputs, mode, progress, seed, on_part) as (inp, out, units):
            return pa.concat_tables(list(_in_input_order(inp, out, units, columns)), promote_options="default")

    def score_to_file(self, inputs: ScoringInput | pa.Table, mode: str, path: Path, progress: bool = True,
                      seed: Optional[int] = None) -> Path:
        """As `score`, but every column goes to the Parquet file `path` (atomically, in `inputs`' order),
        streamed from the scorers' parts a row group at a time: the driver never holds the scores."""
        with self._scored(inputs, mode, progress, seed, None) as (inp, out, units):
            schema = pa.unify_schemas([pq.read_schema(p) for p in sorted(out.glob("part-*.parquet"))],
                                      promote_options="permissive")

            def write(tmp: str) -> None:
                with pq.ParquetWriter(tmp, schema) as writer:
                    for table in _in_input_order(inp, out, units):
                        writer.write_table(_conform(table, schema))

            return atomic(Path(path), write)

    @contextlib.contextmanager
    def _scored(self, inputs: ScoringInput | pa.Table, mode: str, progress: bool, seed: Optional[int],
                on_part: Optional[Callable[[int, int], None]]):
        """(the ScoringInput, the folder of the scorers' Parquet parts, the units they hold) while the parts exist."""
        if isinstance(inputs, pa.Table):
            if inputs.column_names != SCORER_COLUMNS:
                raise ScoringError(f"scorers take exactly {SCORER_COLUMNS}, got {inputs.column_names}")
            tables = pools_dir(self.cfg.data.cache_dir) / "tables"  # where every scorer can read (data.cache_dir)
            tables.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="deft-score-", dir=tables) as tmp:
                with self._scored(write_inputs(inputs, tmp), mode, progress, seed, on_part) as scored:
                    yield scored
            return
        if inputs.num_rows == 0:
            raise ScoringError("nothing to score: the pool is empty")
        scores = Path(inputs.path).parent / "scores"
        scores.mkdir(exist_ok=True)
        out = Path(tempfile.mkdtemp(dir=scores, prefix=f"{mode}-"))
        try:
            units = self._dispatch(inputs, mode, self.cfg.seed if seed is None else seed, out, progress, on_part)
            yield inputs, out, units
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def _dispatch(self, inputs: ScoringInput, mode: str, seed: int, out: Path, progress: bool,
                  on_part: Optional[Callable[[int, int], None]]) -> list[Unit]:
        """Keep every actor busy with units (two in flight each, so none waits for the next) until all are
        written; returns the units (unit i is in part-i). Work goes out as (file, row group, offsets): a
        few bytes a unit, whatever the pool's size.

        Ray Data's `streaming_split` would also feed long-lived actors from a dataset, but a split whose
        consumer dies cannot hand that consumer's blocks to anyone else; here a dead actor's units go back
        in the queue and are scored again, with the same masks, on the revived actor."""
        import ray
        from ray.exceptions import RayActorError

        from actors.scorer import StaleAdapter

        bs = self.cfg.scoring.batch_size_on(self.plan.use_gpu)
        units = plan_units(inputs, bs, len(self.actors))
        queue = deque(units)
        inflight: dict = {}
        deaths = 0

        def submit(i: int) -> None:
            if queue:
                u = queue.popleft()
                ref = self.actors[i].score_unit.remote(inputs.path, u.group, u.offsets, bs, mode, seed,
                                                       str(out / f"part-{u.index:06d}.parquet"), self._adapter_token)
                inflight[ref] = (i, u)

        for _ in range(UNITS_IN_FLIGHT):
            for i in range(len(self.actors)):
                submit(i)
        with tqdm(total=inputs.num_rows, desc=f"scoring ({mode})", unit="row", disable=not progress, leave=False) as bar:
            while inflight:
                done, _ = ray.wait(list(inflight), num_returns=1)
                i, u = inflight.pop(done[0])
                try:
                    ray.get(done[0])
                except (RayActorError, StaleAdapter) as e:
                    # The actor died mid-unit, or Ray restarted it and it does not hold the adapter yet: revive
                    # it (the adapter goes again) and score that unit again.
                    deaths += 1
                    self.deaths += isinstance(e, RayActorError)
                    if deaths > MAX_RESTARTS * len(self.actors) * UNITS_IN_FLIGHT:
                        raise
                    log.warning("scorer %d lost its unit of %d rows (%s); scoring it again", i, u.rows, type(e).__name__)
                    self._revive(i)
                    queue.appendleft(u)
                    submit(i)
                    continue
                bar.update(u.rows)
                if on_part is not None:
                    on_part(i, u.rows)
                submit(i)
        return units

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def _in_input_order(inp: ScoringInput, out: Path, units: list[Unit], columns: Optional[list[str]] = None):
    """The scorers' parts in `inp`'s row order, a row group at a time (tables of up to `row_group_rows`
    rows): a unit's rows are offsets of one row group, and `inp`'s rows go by position, so sorting each
    group's rows by offset restores it, with no lookup by id. Each group's ids are checked against `inp`'s,
    so every asked row is there exactly once. Each part's types are its own (a generation unit whose every
    answer failed to parse has an all-null `prediction`), so they are unified."""
    by_group: dict[int, list[Unit]] = {}
    for u in units:
        by_group.setdefault(u.group, []).append(u)
    start = 0
    for group in sorted(by_group):
        parts = by_group[group]
        files = [out / f"part-{u.index:06d}.parquet" for u in parts]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ScoringError(f"scoring lost rows: a scorer's part is missing ({', '.join(missing)})")
        table = pa.concat_tables([pq.read_table(f, columns=_with_id(columns)) for f in files], promote_options="default")
        offsets = np.concatenate([u.offsets for u in parts])
        if table.num_rows != len(offsets):
            raise ScoringError(f"scoring lost or duplicated rows in row group {group} of {inp.path}: "
                               f"{table.num_rows} rows back for {len(offsets)} asked")
        table = table.take(pa.array(np.argsort(offsets, kind="stable"), pa.int64()))
        expected = inp.ids_slice(start, len(offsets))
        if not table.column("example_id").equals(pa.chunked_array([expected])):
            raise ScoringError(f"scoring mixed up rows in row group {group} of {inp.path}: a part's rows are "
                               f"not the ones its unit asked for")
        start += len(offsets)
        yield table
    if start != inp.num_rows:
        raise ScoringError(f"scoring lost rows: {inp.num_rows - start} of {inp.num_rows} were never planned")


def stream_into(dest: Path, sources: list[tuple[Path, Optional[Callable[[pa.Table], pa.Table]]]],
                batch_rows: int = 65_536) -> Path:
    """Write the rows of several Parquet files (each through its filter, if any) to `dest`, atomically,
    `batch_rows` at a time: memory stays at one batch whatever the files' sizes. The files' schemas are
    unified (a part whose every `prediction` was unparsable has a null-typed column)."""
    schema = pa.unify_schemas([pq.read_schema(p) for p, _ in sources], promote_options="permissive")

    def write(tmp: str) -> None:
        with pq.ParquetWriter(tmp, schema) as writer:
            for path, keep in sources:
                for batch in iter_batches(path, batch_rows):
                    table = pa.Table.from_batches([batch])
                    table = keep(table) if keep is not None else table
                    if table.num_rows:
                        writer.write_table(_conform(table, schema))

    return atomic(dest, write)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def holds_exactly(path: Path, ids: pa.Array) -> bool:
    """Whether the score file `path` holds exactly the rows `ids`, in that order: compared a batch at a
    time, so the file's id column is never whole in the driver."""
    if not path.is_file() or pq.ParquetFile(path).metadata.num_rows != len(ids):
        return False
    start = 0
    for batch in iter_batches(path, BATCH_ROWS, ["example_id"]):
        if not batch.column(0).cast(pa.string()).equals(ids.slice(start, batch.num_rows).cast(pa.string())):
            return False
        start += batch.num_rows
    return True


def _beside_ids(ids: pa.Array, path: Path, columns: Optional[list[str]]) -> pa.Table:
    """example_id (`ids`, whose rows `path` holds in order) and `columns` (default all) of the file."""
    table = read_columns(path, None if columns is None else [c for c in columns if c != "example_id"])
    table = table.drop_columns([c for c in ("example_id",) if c in table.column_names])
    return table.add_column(0, "example_id", pa.chunked_array([ids]))


def _ids_in(path: Optional[Path]) -> Optional[pa.Array]:
    """The example_id column of a score file (nothing else is read), or None if there is no file."""
    if path is None or not Path(path).is_file():
        return None
    return read_columns(path, ["example_id"]).column("example_id").combine_chunks()


def _with_id(columns: Optional[list[str]]) -> Optional[list[str]]:
    """`columns` with example_id first (None: every column)."""
    return None if columns is None else ["example_id", *[c for c in columns if c != "example_id"]]


def _in(ids: pa.Array) -> Callable[[pa.Table], pa.Table]:
    return lambda t: t.filter(pc.is_in(t.column("example_id"), value_set=ids))


def _not_in(ids: Optional[pa.Array]) -> Optional[Callable[[pa.Table], pa.Table]]:
    if ids is None or len(ids) == 0:
        return None
    return lambda t: t.filter(pc.invert(pc.is_in(t.column("example_id"), value_set=ids)))


def _ids(inputs: ScoringInput | pa.Table) -> pa.Array:
    return inputs.example_ids if isinstance(inputs, ScoringInput) else as_id_array(inputs.column("example_id"))


def _either(a: Optional[pa.Array], b: Optional[pa.Array]) -> Optional[pa.Array]:
    if a is None or b is None:
        return a if b is None else b
    return pa.concat_arrays([a, b])


def base_uncertainty(scorer: PoolScorer, inputs: ScoringInput | pa.Table, cache: Optional[Path] = None,
                     shared: Optional[Path] = None, columns: Optional[list[str]] = None) -> pa.Table:
    """Base-model scores for every row of `inputs` (`Pool.scoring_input` or an (example_id, prompt) table),
    in its order: the frozen base never changes, so a row is scored once and cached. Only `columns`
    (default all) come back, so the driver can hold one measure of a large pool rather than every column.

    `cache` is the run's own file (base_uncertainty.parquet). `shared` is a file several runs share
    (`deft compare`): the base model's output for a row depends only on its prompt, so rows any run has
    scored are copied, not re-scored. Both are rewritten atomically, streamed a batch at a time from the
    scorers' parts and the old files, never whole in the driver; a lost race on `shared` only means a row
    is scored again later.
    """
    ids = _ids(inputs)
    cache, shared = (Path(p) if p is not None else None for p in (cache, shared))
    if cache is not None and holds_exactly(cache, ids):  # the run's cache holds these rows, in this order
        return _beside_ids(ids, cache, columns)
    own = _ids_in(cache)
    common = _ids_in(shared)
    known = _either(own, common)
    todo = inputs if known is None else inputs.filter(pc.invert(pc.is_in(ids, value_set=known)))
    if cache is None and shared is None:
        return scorer.score(todo, "base", columns=columns)
    near = (cache or shared).parent
    near.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".deft-base-", dir=near) as tmp:
        fresh = scorer.score_to_file(todo, "base", Path(tmp) / "fresh.parquet") if todo.num_rows else None
        if cache is not None:
            # rows this call needs that the run's own cache lacks (candidates differ per round): from the
            # shared file, or freshly scored
            from_common = None
            if common is not None:
                wanted = pc.filter(common, pc.is_in(common, value_set=ids))
                if own is not None:
                    wanted = pc.filter(wanted, pc.invert(pc.is_in(wanted, value_set=own)))
                if len(wanted):
                    from_common = _in(wanted)
            sources = ([(cache, None)] if own is not None else []) + \
                      ([(shared, from_common)] if from_common is not None else []) + ([(fresh, None)] if fresh else [])
            if len(sources) > (own is not None):
                stream_into(cache, sources)
        if shared is not None and fresh is not None:
            now = _ids_in(shared)  # re-read: another run may have added rows since
            stream_into(shared, ([(shared, None)] if now is not None else []) + [(fresh, _not_in(now))])
        if cache is not None and own is None and from_common is None and fresh is not None:
            return _beside_ids(ids, cache, columns)  # the cache is this call's rows alone, in `inputs`' order
        del own, common, known, todo  # the driver's largest call: hold no more ids than needed
        files = [cache] if cache is not None else [p for p in (shared, fresh) if p is not None and p.is_file()]
        held = pa.concat_tables([read_columns(f, _with_id(columns)) for f in files], promote_options="default")
    # A cache made by this call alone is in `inputs`' order already; otherwise one lookup places the rows
    # (after a race on the shared file a row may be there twice, and the first is taken).
    return in_order(held, ids)
