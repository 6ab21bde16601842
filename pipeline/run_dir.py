"""The run directory: the source of truth of a run, laid out as DESIGN.md describes, written atomically.

    RUN/config.yaml  state.json  labeled.parquet  base_uncertainty.parquet  metrics.jsonl
    RUN/rounds/k/{scores,selected}.parquet  RUN/rounds/k/adapter/  RUN/rounds/k/to_label.jsonl
    RUN/report.md  RUN/learning_curve.png

Every write is temp file + os.replace, so a killed driver leaves either the old file or the new one.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import pyarrow as pa
import yaml

from pipeline.config import Config, frozen_config, to_dict
from pipeline.io import read_parquet, write_json, write_parquet, write_text

PHASES = ("scoring", "selecting", "labeling", "training", "evaluating", "done")
LABELED_SCHEMA = pa.schema(
    [("example_id", pa.string()), ("label", pa.string()), ("round_added", pa.int32()), ("source", pa.string())]
)


class RunLocked(RuntimeError):
    pass


@dataclass
class RunState:
    round: int = 0
    phase: str = "scoring"
    history: list = field(default_factory=list)  # (round, phase) transitions, for `deft status`

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"state.json: phase should be one of {list(PHASES)}, got {self.phase!r}")


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: Optional[int] = None

    # ---- paths -----------------------------------------------------------------------------------------
    config_file = property(lambda self: self.path / "config.yaml")
    state_file = property(lambda self: self.path / "state.json")
    labeled_file = property(lambda self: self.path / "labeled.parquet")
    base_uncertainty_file = property(lambda self: self.path / "base_uncertainty.parquet")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    report_file = property(lambda self: self.path / "report.md")
    curve_file = property(lambda self: self.path / "learning_curve.png")

    def round_dir(self, k: int) -> Path:
        return self.path / "rounds" / str(k)

    def scores_file(self, k: int) -> Path:
        return self.round_dir(k) / "scores.parquet"

    def selected_file(self, k: int) -> Path:
        return self.round_dir(k) / "selected.parquet"

    def adapter_dir(self, k: int) -> Path:
        return self.round_dir(k) / "adapter"

    def to_label_file(self, k: int) -> Path:
        return self.round_dir(k) / "to_label.jsonl"

    def imported_file(self, k: int) -> Path:
        return self.round_dir(k) / "imported.parquet"

    # ---- creation and lock -----------------------------------------------------------------------------
    def create(self, cfg: Config) -> "RunDir":
        """Make the run directory with its config and first state, all at once, and hold its lock.

        Everything is written into a hidden sibling, locked there, and renamed into place: the directory
        either does not exist or is a whole run, whatever kills the process. An existing empty directory
        is taken (rename replaces it); anything else at the path is refused and left as it is."""
        self.refuse_existing()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.creating-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        staged = RunDir(tmp)
        try:
            staged.lock()
            staged.write_config(cfg)
            staged.write_state(RunState())
            os.rename(tmp, self.path)
        except OSError as e:
            staged.unlock()
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{self.path}: cannot create the run directory: {e.strerror}") from None
        except BaseException:
            staged.unlock()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._lock_fd, staged._lock_fd = staged._lock_fd, None  # the lock is on the file, which moved with it
        return self

    def refuse_existing(self) -> None:
        """A clear error if the path is taken: a run already, a file, or a directory with something in it."""
        if self.exists():
            raise FileExistsError(f"{self.path} already holds a run; use `deft resume {self.path}`")
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"{self.path} is a file; the run directory should be a new or empty directory")
        if self.path.is_dir() and any(self.path.iterdir()):
            raise FileExistsError(f"{self.path} is not empty and holds no run; choose a new directory")

    def lock(self) -> "RunDir":
        """One driver per run: a second one fails at once instead of interleaving writes. The lock is an
        flock, so a driver that dies (even by SIGKILL) releases it with its process; a stale .lock file
        left behind locks nothing. The file names the holder: pid and host."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such run directory")
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLocked(f"{self.path} is in use by {holder}; wait for it or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd
        return self

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- config and state ------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.state_file.is_file()

    def write_config(self, cfg: Config) -> None:
        write_text(self.config_file, yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def read_config(self) -> Config:
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a deft run (no config.yaml)")
        return frozen_config(yaml.safe_load(self.config_file.read_text()) or {})

    def read_state(self) -> RunState:
        if not self.state_file.is_file():
            raise FileNotFoundError(f"{self.path} has no state.json: not a deft run, or it never started")
        return RunState(**json.loads(self.state_file.read_text()))

    def write_state(self, state: RunState) -> None:
        write_json(self.state_file, asdict(state))

    # ---- labels and metrics ----------------------------------------------------------------------------
    def read_labeled(self) -> pa.Table:
        return read_parquet(self.labeled_file) if self.labeled_file.is_file() else LABELED_SCHEMA.empty_table()

    def add_labels(self, new: pa.Table) -> pa.Table:
        """Append labels; ids already labelled are kept as they are, so a repeated call adds nothing."""
        current = self.read_labeled()
        have = set(current.column("example_id").to_pylist())
        fresh = [r for r in new.cast(LABELED_SCHEMA).to_pylist() if r["example_id"] not in have]
        table = pa.concat_tables([current, pa.Table.from_pylist(fresh, schema=LABELED_SCHEMA)])
        write_parquet(self.labeled_file, table)
        return table

    def read_metrics(self) -> list[dict]:
        if not self.metrics_file.is_file():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def put_metrics(self, line: dict) -> None:
        """Write the metrics of one round, replacing any earlier line for that round (resume-safe)."""
        lines = [m for m in self.read_metrics() if m.get("round") != line["round"]] + [line]
        lines.sort(key=lambda m: m["round"])
        write_text(self.metrics_file, "".join(json.dumps(m, sort_keys=True) + "\n" for m in lines))
