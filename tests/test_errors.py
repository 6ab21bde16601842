"""The one error surface: errors raised inside Ray tasks, actors and Ray Train workers reach the user as
the line they would make on the driver; everything else is one line with exit code 1 and a hint."""
import pytest

from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.data import DataError
from pipeline.errors import BAD_INPUT, FAILED, describe, root_cause


def test_an_error_raised_in_a_ray_actor_is_unwrapped_to_its_cause(ray_local):
    import ray

    @ray.remote(num_cpus=0)
    class Picky:
        def check(self):
            raise ConfigError("task.label_words: label words [' a', ' ab'] share a first token [5, 5]")

    actor = Picky.remote()
    with pytest.raises(Exception) as info:
        ray.get(actor.check.remote())
    assert type(info.value).__name__.startswith("RayTaskError")  # what Ray raises on the driver
    message, code = describe(info.value)
    assert (message, code) == ("task.label_words: label words [' a', ' ab'] share a first token [5, 5]", BAD_INPUT)
    ray.kill(actor)


def test_a_dead_actor_is_one_line_and_exit_1(ray_local):
    import os

    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class Doomed:
        def die(self):
            os._exit(1)

    with pytest.raises(Exception) as info:
        ray.get(Doomed.remote().die.remote())
    message, code = describe(info.value)
    assert code == FAILED and message.startswith("a Ray process of the run died (")
    assert "\n" not in message


def test_ray_train_failures_unwrap_to_the_first_worker_error():
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    error = WorkerGroupError("training failed", {1: RuntimeError("rank 1"), 0: DataError("pool.jsonl:3: bad")})
    assert isinstance(root_cause(error), DataError) and describe(error) == ("pool.jsonl:3: bad", BAD_INPUT)
    assert str(root_cause(ControllerError(ValueError("x")))) == "x"


def test_an_unexpected_error_is_one_line_with_a_hint_and_v_adds_the_traceback(monkeypatch, capsys, tmp_path):
    import pipeline.cli as cli

    def boom(args):
        raise KeyError("surprise")

    monkeypatch.setitem(cli.__dict__, "cmd_status", boom)
    assert main(["status", str(tmp_path)]) == FAILED
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "deft: error: KeyError: 'surprise'" and "Traceback" not in err and "-v" in err
    assert main(["-v", "status", str(tmp_path)]) == FAILED
    assert "Traceback" in capsys.readouterr().err
