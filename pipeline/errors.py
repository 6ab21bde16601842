"""One error surface: whatever fails, a person sees one `deft: error: ...` line (the traceback only with -v).

Errors raised inside Ray actors and Ray Train workers arrive wrapped (RayTaskError, WorkerGroupError,
ControllerError); `root_cause` unwraps them to the exception that was raised, so a bad label word found
in a scoring actor reads the same as one found on the driver.
"""
from __future__ import annotations

from typing import Optional

BAD_INPUT = 2  # the exit code of anything the user can fix: the message names the file, line or key
FAILED = 1  # anything else: a dead worker, a bug


def _user_errors() -> tuple[type, ...]:
    from pipeline.config import ConfigError
    from pipeline.data import DataError
    from pipeline.oracles import LabelImportError
    from pipeline.run_dir import RunLocked

    return (ConfigError, DataError, LabelImportError, RunLocked, FileNotFoundError, FileExistsError,
            NotADirectoryError, IsADirectoryError, PermissionError, UnicodeDecodeError, ValueError)


def root_cause(error: BaseException) -> BaseException:
    """The exception that was really raised, out of Ray's wrappers (task errors, Ray Train failures)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        cause: Optional[BaseException] = None
        if getattr(error, "worker_failures", None):  # ray.train WorkerGroupError: {rank: exception}
            cause = error.worker_failures[min(error.worker_failures)]
        elif getattr(error, "controller_failure", None) is not None:  # ray.train ControllerError
            cause = error.controller_failure
        elif type(error).__name__.startswith("RayTaskError") and getattr(error, "cause", None) is not None:
            cause = error.cause
        if cause is None:
            break
        error = cause
    return error


def _is_ray_death(error: BaseException) -> bool:
    try:
        from ray import exceptions as rx
    except ImportError:
        return False
    return isinstance(error, (rx.RayActorError, rx.WorkerCrashedError, rx.ObjectLostError, rx.OutOfMemoryError,
                              rx.NodeDiedError, rx.GetTimeoutError))


def describe(error: BaseException) -> tuple[str, int]:
    """(the message after `deft: error: `, the exit code)."""
    cause = root_cause(error)
    if isinstance(cause, UnicodeDecodeError):
        return f"a file is not UTF-8 text: {cause}", BAD_INPUT
    if isinstance(cause, _user_errors()):
        return str(cause), BAD_INPUT
    if _is_ray_death(cause):
        return f"a Ray process of the run died ({type(cause).__name__}): {_first_line(cause)}", FAILED
    return f"{type(cause).__name__}: {_first_line(cause)}", FAILED


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"
