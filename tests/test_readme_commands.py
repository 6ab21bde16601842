"""Every `deft` command of README.md's ```bash blocks and the Python API block, run as written (in order,
in a scratch directory), with the tiny model and a few rows appended as --set overrides. `make
quickstart` is tests/test_compare.py's quickstart test; `ray job submit` is tests/test_ray_job_submit.py."""
import json
import re
import shlex
from pathlib import Path

import pytest

from pipeline.cli import main as deft
from pipeline.run_dir import RunDir

from conftest import SHARED

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def bash_commands(section: str) -> list[str]:
    """`deft ...` lines of the section's ```bash blocks, comments cut, optional [--flags] dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("deft "):
                out.append(re.sub(r"\s*\[[^\]]*\]", "", line))
    return out


def tiny_overrides(model_dir: str, command: str) -> list[str]:
    task = re.search(r"configs/(\w+)\.yaml", command).group(1)
    data = (["data.demo_size=40"] if task == "quickstart" else
            ["data.limit=30", f"data.path={SHARED / task / 'train.jsonl'}", f"data.test_path={SHARED / task / 'test.jsonl'}"])
    sets = [f"model.name={model_dir}", "model.dtype=float32", "model.max_length=128", "lora.r=4", *data,
            "self_training.sessions=2", "self_training.steps=2", "self_training.batch_size=4", "self_training.meta_batch=2",
            "al.initial_size=6", "al.batch_size=5", "al.rounds=2", "al.eval_limit=12", "al.ece_bins=10",
            "train.backend=local", "train.epochs=1", "train.min_steps=4", "train.batch_size=4", "scoring.batch_size=4",
            "task.max_new_tokens=4", "cluster.num_cpus=2"]
    return [x for kv in sets for x in ("--set", kv)]


def test_every_command_of_using_it_runs(tiny_model_dir, ray_local, tmp_path, monkeypatch, capsys):
    if not (SHARED / "boolq").is_dir() or not (SHARED / "gsm8k").is_dir():
        pytest.skip(f"the shared datasets are not at {SHARED}")
    readme = (REPO / "README.md").read_text()
    commands = bash_commands(readme)
    assert len(commands) >= 12, commands
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    for command in commands:
        argv = shlex.split(command)[1:]
        if argv[:2] == ["label", "import"] and not Path(argv[2]).exists():  # a human run waiting at runs/x, a filled file
            _prepare_human_run(tiny_model_dir, argv[2], argv[3], capsys)
        elif argv[:2] == ["label", "import"]:  # a tool's export of the waiting round: the fixture of its shape
            _tool_export(argv[2], argv[3])
        if any(a.startswith("configs/") for a in argv):
            argv += tiny_overrides(tiny_model_dir, command)
        if argv[0] == "compare":  # 12 runs as written: seed 0 and the cold start only, to keep the suite's time down
            argv[argv.index("--seeds") + 1] = "0"
            argv += ["--set", "al.rounds=1"]
        code = deft(argv)
        out = capsys.readouterr()
        waiting = argv[0] == "resume" and argv[1] == "runs/x"  # round 1 of the human run needs labels again
        assert code == (3 if waiting else 0), f"{command}: exit {code}\n{out.err[-2000:]}"
        if argv[0] == "compare":
            summary = json.loads(out.out.strip().splitlines()[-1])
            assert set(summary["aulc"]) == set(argv[argv.index("--strategies") + 1].split(","))
    assert RunDir("runs/boolq-star").read_state().phase == "done"
    assert RunDir("runs/boolq-random").read_config().al.strategy == "random"
    assert Path("scores.parquet").is_file() and Path("runs/boolq-star/report.md").is_file()
    assert RunDir("runs/x").read_labeled().num_rows == 6

    # The Python API block, with the same tiny overrides added to its load_config call.
    import pipeline

    code = re.search(r"```python\n(.*?)```", readme_section("Using it"), re.S).group(1)
    real = pipeline.load_config
    extra = [a for a in tiny_overrides(tiny_model_dir, "configs/boolq.yaml") if a != "--set"]
    monkeypatch.setattr(pipeline, "load_config", lambda path, overrides=(): real(path, list(overrides) + extra))
    api = tmp_path / "api"  # a fresh place: the block starts runs/boolq-star, which the commands above made
    api.mkdir()
    (api / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(api)
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})
    accuracy, ece = map(float, capsys.readouterr().out.split()[-2:])
    assert 0 <= accuracy <= 1 and 0 <= ece <= 1
    assert RunDir("runs/boolq-star").read_state().phase == "done"


def _tool_export(run: str, name: str) -> None:
    from test_label_tools import from_fixture

    from pipeline.io import read_parquet

    k = RunDir(run).read_state().round
    ids = read_parquet(RunDir(run).selected_file(k)).column("example_id").to_pylist()
    fixture = "argilla_flat.jsonl" if "argilla" in name else "label_studio_export.json"
    from_fixture(fixture, ids, k, Path(name))


def _prepare_human_run(model_dir: str, run: str, filled: str, capsys) -> None:
    argv = ["run", "configs/boolq.yaml", "--set", "al.oracle=human", "--run-dir", run]
    assert deft(argv + tiny_overrides(model_dir, "configs/boolq.yaml")) == 3
    capsys.readouterr()
    gold = {}
    for line in (SHARED / "boolq" / "train.jsonl").read_text().splitlines()[:200]:
        row = json.loads(line)
        gold[row["question"]] = row["answer"].split()[-1]
    rows = [json.loads(l) for l in (Path(run) / "rounds" / "0" / "to_label.jsonl").read_text().splitlines()]
    for r in rows:
        question = r["prompt"].rsplit("\nthe correct answer is", 1)[0]
        r["label"] = gold.get(question, "true")
    Path(filled).write_text("".join(json.dumps(r) + "\n" for r in rows))
