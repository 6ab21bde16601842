"""A corpus of bad input, one case a line: every case must end in one `deft: error:` line that names the
culprit, a non-zero exit, no traceback, and a workspace byte-identical to before (no half-made run).

    Case(id, argv, expected text of the error, files={name: content}, run="waiting"|"done", ray=False)

argv placeholders (literal braces doubled: {{question}}): {cfg} a valid tiny-model config, {dir} the workspace, {model} the tiny model,
{run} a run directory that does not exist yet, {waiting} a run waiting for human labels, {done} a run
that has state but never evaluated. `files` are written into the workspace first ({dir}/<name>), with
@id0@, @id1@, .. replaced by the waiting round's example ids.
"""
from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import to_dict
from pipeline.data import pool_from_config
from pipeline.io import write_parquet
from pipeline.oracles import export_to_label
from pipeline.run_dir import RunDir, RunState
from pipeline.tasks import get_task
from tests.conftest import tiny_config

TRUE_FALSE = "".join(json.dumps({"question": f"is {i} even?", "answer": ["true", "false"][i % 2]}) + "\n" for i in range(6))
CUSTOM = ("--set task.name=custom --set \"task.labels=['true','false']\" --set data.path={dir}/tf.jsonl "
          "--set data.demo_size=6")


@dataclass
class Case:
    id: str
    argv: str
    expected: str
    files: dict = field(default_factory=dict)
    ray: bool = False


LS_ANN = '{{"id": 1, "completed_by": 1, "was_cancelled": false, "result": [{{"from_name": "label", "to_name": "prompt", "type": "choices", "value": {{"choices": ["{}"]}}}}]}}'
LS_TASK = '[{{"id": {id}, "data": {{"prompt": "p", "example_id": "{eid}", "deft_round": {rnd}}}, "annotations": [{ann}]}}]'
AG_FLAT = ('{{"id": "{eid}", "status": "completed", "_server_id": null, "prompt": "p", "example_id": "{eid}", "deft_round": 0, '
           '"label.responses": {values}, "label.responses.status": {status}}}\n')
AG_NESTED = ('{{"id": "{eid}", "fields": {{"prompt": "p"}}, "metadata": {{"example_id": "{eid}", "deft_round": 0}}, "suggestions": {{}}, '
             '"responses": {{"label": [{{"value": "true", "user_id": "u1"}}]}}, "vectors": {{}}, "status": "completed"}}')

CASES = [
    # ---- config ----------------------------------------------------------------------------------------
    Case("config-missing", "run {dir}/nope.yaml --run-dir {run}", "config file not found"),
    Case("config-not-yaml", "run {dir}/bad.yaml --run-dir {run}", "not valid YAML", {"bad.yaml": "al: [1, 2\n"}),
    Case("config-not-mapping", "run {dir}/list.yaml --run-dir {run}", "top level should be a mapping", {"list.yaml": "- 1\n"}),
    Case("config-unknown-key", "run {cfg} --run-dir {run} --set al.roundz=3", "unknown config key 'al.roundz'"),
    Case("config-unknown-section", "run {cfg} --run-dir {run} --set trian.lr=1", "unknown config key 'trian'"),
    Case("config-wrong-type", "run {cfg} --run-dir {run} --set al.rounds=many", "al.rounds should be an integer"),
    Case("config-negative-seed", "run {cfg} --run-dir {run} --set seed=-1", "seed should be >= 0"),
    Case("config-zero-cpus", "run {cfg} --run-dir {run} --set cluster.num_cpus=0", "cluster.num_cpus should be >= 1"),
    Case("config-negative-cpus", "run {cfg} --run-dir {run} --set cluster.num_cpus=-2", "cluster.num_cpus should be >= 1"),
    Case("config-demo-size-zero", "run {cfg} --run-dir {run} --set data.demo_size=0", "data.demo_size should be >= 1"),
    Case("config-demo-size-negative", "run {cfg} --run-dir {run} --set data.demo_size=-5", "data.demo_size should be >= 1"),
    Case("config-set-no-equals", "run {cfg} --run-dir {run} --set al.rounds", "--set expects key=value"),
    Case("config-set-into-value", "run {cfg} --run-dir {run} --set seed.x=1", "'seed' is not a section"),
    Case("config-unknown-strategy", "run {cfg} --run-dir {run} --set al.strategy=bold", "al.strategy should be one of"),
    Case("config-bald-one-pass", "run {cfg} --run-dir {run} --set al.strategy=bald --set scoring.mc_passes=1", "mc_passes >= 2"),
    Case("config-measure-clash", "run {cfg} --run-dir {run} --set al.strategy=margin --set al.measure=entropy", "al.measure=entropy has no effect"),
    Case("config-star-bald", "run {cfg} --run-dir {run} --set al.measure=bald", "al.measure=bald is meaningless"),
    Case("config-lora-dropout", "run {cfg} --run-dir {run} --set lora.dropout=1.5", "lora.dropout should be in [0, 1)"),
    Case("config-yaml-boolean-label", "run {cfg} --run-dir {run} --set task.name=custom --set task.labels=[yes,no]",
         "YAML reads yes/no/true/false"),
    Case("config-temp-dir-too-long", "run {cfg} --run-dir {run} --set cluster.temp_dir=/tmp/" + "x" * 60, "cluster.temp_dir is too long"),
    Case("config-candidates-too-few", "run {cfg} --run-dir {run} --set al.candidates=2", "al.candidates should be >="),
    Case("config-preset", "run {cfg} --run-dir {run} --set train.preset=huge", "train.preset should be one of"),
    Case("config-st-generation", "run {cfg} --run-dir {run} --set task.name=gsm8k --set self_training.enabled=true",
         "self_training.enabled needs a verbalizer task"),
    # ---- tasks -----------------------------------------------------------------------------------------
    Case("task-regex-invalid", "run {cfg} --run-dir {run} --set task.name=custom --set task.kind=generation --set task.answer_regex=(",
         "task.answer_regex is not a valid regular expression"),
    Case("task-regex-no-group", "run {cfg} --run-dir {run} --set task.name=custom --set task.kind=generation --set task.answer_regex=answer",
         "task.answer_regex needs a group"),
    Case("task-template-positional", "run {cfg} --run-dir {run} " + CUSTOM + " --set task.prompt_template='Q: {{}} A:'",
         "positional field"),
    Case("task-template-unbalanced", "run {cfg} --run-dir {run} " + CUSTOM + " --set task.prompt_template='Q: {{question'",
         "task.prompt_template is not a valid template"),
    Case("task-template-unknown-field", "run {cfg} --run-dir {run} " + CUSTOM + " --set 'task.prompt_template={{question}} {{answer}}'",
         "not in task.input_fields"),
    Case("task-answer-is-input", "run {cfg} --run-dir {run} " + CUSTOM + " --set task.input_fields=[question,answer]",
         "the prompt would contain the answer"),
    Case("task-one-label", "run {cfg} --run-dir {run} " + CUSTOM + " --set \"task.labels=['true']\"", "at least 2 labels"),
    Case("task-label-words-share-token", "run {cfg} --run-dir {run} " + CUSTOM + " --set \"task.label_words=[' true', ' true!']\"",
         "task.label_words", {"tf.jsonl": TRUE_FALSE}),
    Case("task-label-not-in-set", "run {cfg} --run-dir {run} " + CUSTOM + " --set \"task.labels=['yes','no']\"",
         "is not in the label set", {"tf.jsonl": TRUE_FALSE}),
    # ---- pools and test splits, every format -------------------------------------------------------------
    Case("pool-missing", "run {cfg} --run-dir {run} --set data.path={dir}/none.jsonl", "data file not found"),
    Case("pool-empty", "run {cfg} --run-dir {run} --set data.path={dir}/empty.jsonl", "no usable rows", {"empty.jsonl": ""}),
    Case("pool-bad-json", "run {cfg} --run-dir {run} --set data.path={dir}/p.jsonl", "p.jsonl:2: field '<json>'",
         {"p.jsonl": TRUE_FALSE.splitlines(True)[0] + "{oops\n"}),
    Case("pool-not-object", "run {cfg} --run-dir {run} --set data.path={dir}/p.jsonl", "expected an object", {"p.jsonl": "[1, 2]\n"}),
    Case("pool-missing-field", "run {cfg} --run-dir {run} --set data.path={dir}/p.jsonl", "p.jsonl:1: field 'question': missing",
         {"p.jsonl": '{"q": "x", "answer": "the correct answer is true"}\n'}),
    Case("pool-non-utf8-jsonl", "run {cfg} --run-dir {run} --set data.path={dir}/p.jsonl", "p.jsonl:1: field '<json>'",
         {"p.jsonl": b'{"question": "caf\xe9?", "answer": "the correct answer is true"}\n'}),
    Case("pool-corrupt-parquet", "run {cfg} --run-dir {run} --set data.path={dir}/p.parquet", "not a readable Parquet file",
         {"p.parquet": b"PAR1 this is not parquet"}),
    Case("pool-non-utf8-csv", "run {cfg} --run-dir {run} --set data.path={dir}/p.csv", "p.csv: not UTF-8 text",
         {"p.csv": b"question,answer\ncaf\xe9,the correct answer is true\n"}),
    Case("pool-csv-extra-values", "run {cfg} --run-dir {run} --set data.path={dir}/p.csv", "p.csv:2: field '<csv>'",
         {"p.csv": "question,answer\na,b,c\n"}),
    Case("pool-tsv-missing-field", "run {cfg} --run-dir {run} --set data.path={dir}/p.tsv", "p.tsv:2: field 'answer'",
         {"p.tsv": "question\tother\nis 3 even?\tx\n"}),
    Case("pool-unknown-format", "run {cfg} --run-dir {run} --set data.path={dir}/p.txt", "unknown format '.txt'", {"p.txt": "hi\n"}),
    Case("pool-duplicate-id", "run {cfg} --run-dir {run} --set data.path={dir}/p.jsonl --set data.id_field=id", "duplicate example_id",
         {"p.jsonl": '{"id": 1, "question": "a", "answer": "the correct answer is true"}\n'
                     '{"id": 1, "question": "b", "answer": "the correct answer is true"}\n'}),
    Case("pool-hf-offline", "run {cfg} --run-dir {run} --set data.path=hf:nobody/nothing:train", "cannot load the dataset"),
    Case("pool-hf-malformed", "run {cfg} --run-dir {run} --set data.path=hf:justaname", "expected hf:<dataset id>"),
    Case("test-split-missing", "run {cfg} --run-dir {run} --set data.test_path={dir}/test.jsonl", "data file not found"),
    # ---- models ----------------------------------------------------------------------------------------
    Case("model-missing-dir", "run {cfg} --run-dir {run} --set model.name={dir}/no-model", "directory not found"),
    Case("model-empty-dir", "run {cfg} --run-dir {run} --set model.name={dir}/m", "is an empty directory", {"m/": None}),
    Case("model-pickle-only", "run {cfg} --run-dir {run} --set model.name={dir}/m", "pickle weights",
         {"m/config.json": "{}", "m/pytorch_model.bin": b"\x80\x02"}),
    Case("model-no-config", "run {cfg} --run-dir {run} --set model.name={dir}/m", "has no config.json", {"m/weights.safetensors": b"x"}),
    Case("model-is-file", "run {cfg} --run-dir {run} --set model.name={dir}/m.bin", "is a file", {"m.bin": b"x"}),
    Case("model-hub-offline", "run {cfg} --run-dir {run} --set model.name=nobody/no-such-model", "not in the Hugging Face cache"),
    # ---- run directories ---------------------------------------------------------------------------------
    Case("rundir-is-file", "run {cfg} --run-dir {dir}/afile", "is a file", {"afile": "x"}),
    Case("rundir-not-empty", "run {cfg} --run-dir {dir}/full", "is not empty and holds no run", {"full/notes.txt": "x"}),
    Case("rundir-holds-run", "run {cfg} --run-dir {done}", "already holds a run"),
    # ---- resources -------------------------------------------------------------------------------------
    Case("resources-scorer-too-big", "run {cfg} --run-dir {run} --set cluster.scorer_cpus=64", "2 scorers x 64.0 CPU leave no CPU", ray=True),
    Case("resources-too-many-scorers", "run {cfg} --run-dir {run} --set scoring.num_actors=9 --set cluster.scorer_cpus=0.5",
         "9 scorers x 0.5 CPU leave no CPU", ray=True),
    # ---- other commands ----------------------------------------------------------------------------------
    Case("resume-not-a-run", "resume {dir}", "not a deft run"),
    Case("resume-unsafe-key", "resume {done} --set al.rounds=9", "--set al.rounds: cannot change"),
    Case("resume-pool-moved", "resume {done} --set data.path={dir}/none.jsonl", "deft resume"),
    Case("status-not-a-run", "status {dir}/nowhere", "not a deft run"),
    Case("report-never-evaluated", "report {done}", "no round has been evaluated yet"),
    Case("report-not-a-run", "report {dir}", "not a deft run"),
    Case("score-missing-pool", "score {cfg} --set data.path={dir}/none.jsonl", "data file not found"),
    Case("compare-bad-seeds", "compare {cfg} --out {dir}/cmp --seeds 0,x", "--seeds should be comma-separated integers"),
    Case("compare-bad-strategy", "compare {cfg} --out {dir}/cmp --strategies random,bold", "bold"),
    # ---- human labels ----------------------------------------------------------------------------------
    Case("label-export-not-waiting", "label export {done}", "is not waiting for human labels"),
    Case("label-import-missing-file", "label import {waiting} {dir}/none.jsonl", "label file not found"),
    Case("label-import-bad-json", "label import {waiting} {dir}/l.jsonl", "l.jsonl:1: undecodable JSON", {"l.jsonl": "{nope\n"}),
    Case("label-import-non-utf8", "label import {waiting} {dir}/l.jsonl", "l.jsonl:1: not UTF-8", {"l.jsonl": b'{"label": "\xff"}\n'}),
    Case("label-import-unknown-id", "label import {waiting} {dir}/l.jsonl", "unknown example_id 'zzz'",
         {"l.jsonl": '{"example_id": "zzz", "label": "true"}\n'}),
    Case("label-import-no-id", "label import {waiting} {dir}/l.jsonl", "missing field 'example_id'", {"l.jsonl": '{"label": "true"}\n'}),
    Case("label-import-empty", "label import {waiting} {dir}/l.jsonl", "no row has a label", {"l.jsonl": ""}),
    Case("label-import-bad-label", "label import {waiting} {waiting}/rounds/0/filled-bad.jsonl", "filled-bad.jsonl:1:"),
    Case("label-export-over-labels", "label export {waiting} --out {dir}/mine.jsonl", "holds 1 filled label",
         {"mine.jsonl": '{"example_id": "a", "prompt": "p", "label": "true"}\n'}),
    Case("label-export-over-other-file", "label export {waiting} --out {dir}/notes.md", "is not an empty deft label file",
         {"notes.md": "# my notes\n"}),
    Case("label-export-bad-format", "label export {waiting} --format csv", "invalid choice: 'csv'"),
    Case("label-export-tool-over-other-file", "label export {waiting} --format label-studio --out {dir}/notes.json",
         "notes.json exists and differs from this export", {"notes.json": "[]\n"}),
    # Label Studio: files shaped like its JSON export; @id0@.. are the waiting round's example ids
    Case("ls-tie", "label import {waiting} {dir}/ls.json", "task 7: a tie between 'true', 'false'",
         {"ls.json": LS_TASK.format(id=7, eid="@id0@", rnd=0, ann=LS_ANN.format("true") + "," + LS_ANN.format("false"))}),
    Case("ls-label-outside-set", "label import {waiting} {dir}/ls.json", "task 7: label 'maybe' is not in the label set",
         {"ls.json": LS_TASK.format(id=7, eid="@id0@", rnd=0, ann=LS_ANN.format("maybe"))}),
    Case("ls-unknown-id", "label import {waiting} {dir}/ls.json", "task 7: unknown example_id 'zzz'",
         {"ls.json": LS_TASK.format(id=7, eid="zzz", rnd=0, ann=LS_ANN.format("true"))}),
    Case("ls-wrong-round", "label import {waiting} {dir}/ls.json", "was exported for round 3; this run is waiting for round 0",
         {"ls.json": LS_TASK.format(id=7, eid="@id0@", rnd=3, ann=LS_ANN.format("true"))}),
    Case("ls-no-example-id", "label import {waiting} {dir}/ls.json", "task 7: data has no 'example_id'",
         {"ls.json": '[{"id": 7, "data": {"text": "x"}, "annotations": [' + LS_ANN.format("true") + ']}]'}),
    Case("ls-duplicate-task", "label import {waiting} {dir}/ls.json", "task 8: duplicate example_id",
         {"ls.json": "[" + LS_TASK.format(id=7, eid="@id0@", rnd=0, ann=LS_ANN.format("true"))[1:-1] + ","
          + LS_TASK.format(id=8, eid="@id0@", rnd=0, ann=LS_ANN.format("true"))[1:-1] + "]"}),
    Case("ls-json-min", "label import {waiting} {dir}/ls.json", "JSON-MIN",
         {"ls.json": '[{"example_id": "@id0@", "label": "true", "annotator": 1, "annotation_id": 3}]'}),
    Case("ls-not-a-list", "label import {waiting} {dir}/ls.json", "ls.json: a JSON list of objects was expected",
         {"ls.json": '["a", "b"]'}),
    Case("ls-all-skipped", "label import {waiting} {dir}/ls.json", "no row has a label",
         {"ls.json": LS_TASK.format(id=7, eid="@id0@", rnd=0, ann='{"id": 1, "result": [], "was_cancelled": true}')}),
    # Argilla: flat records (records.to_list(flatten=True) / to_datasets()) and nested ones (Record.to_dict())
    Case("argilla-tie", "label import {waiting} {dir}/ag.jsonl", "a tie between 'false', 'true'",
         {"ag.jsonl": AG_FLAT.format(eid="@id1@", values='["false", "true"]', status='["submitted", "submitted"]')}),
    Case("argilla-label-outside-set", "label import {waiting} {dir}/ag.jsonl", "ag.jsonl:1 (id @id1@): label 'perhaps' is not in the label set",
         {"ag.jsonl": AG_FLAT.format(eid="@id1@", values='["perhaps"]', status='["submitted"]')}),
    Case("argilla-unknown-id", "label import {waiting} {dir}/ag.jsonl", "unknown example_id 'qqq'",
         {"ag.jsonl": AG_FLAT.format(eid="qqq", values='["true"]', status='["submitted"]')}),
    Case("argilla-nested-duplicate", "label import {waiting} {dir}/ag.json", "record 2 (id @id2@): duplicate example_id",
         {"ag.json": "[" + AG_NESTED.format(eid="@id2@") + "," + AG_NESTED.format(eid="@id2@") + "]"}),
    Case("argilla-folder-without-records", "label import {waiting} {dir}/ds", "is a directory without records.json",
         {"ds/": ""}),
    Case("label-import-unknown-format", "label import {waiting} {dir}/x.json", "not a deft, Label Studio or Argilla label file",
         {"x.json": '[{"text": "a", "sentiment": "pos"}]'}),
]


def _write(root: Path, files: dict, ids: list[str]) -> None:
    for name, content in files.items():
        if isinstance(content, str):
            for i, e in enumerate(ids):
                content = content.replace(f"@id{i}@", e)
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _runs(root: Path, model_dir: str) -> None:
    """{done}: a run made by RunDir.create, state moved to round 0 training, never evaluated. {waiting}: a run
    stopped for human labels in round 0, its to_label.jsonl exported, plus a filled file with a bad label."""
    cfg = tiny_config(model_dir)
    done = RunDir(root / "done").create(cfg)
    done.write_state(RunState(0, "training"))
    done.unlock()
    human = tiny_config(model_dir, al={"oracle": "human", "initial_size": 3})
    waiting = RunDir(root / "waiting").create(human)
    pool = pool_from_config(human.data, get_task(human.task), 0, require_label=False)
    ids = pool.example_ids[:3]
    write_parquet(waiting.selected_file(0), pa.table({"example_id": ids, "rank": [0, 1, 2], "score": [0.0] * 3}))
    waiting.write_state(RunState(0, "labeling"))
    export_to_label(waiting, 0, ids, pool)
    (waiting.round_dir(0) / "filled-bad.jsonl").write_text(json.dumps({"example_id": ids[0], "label": "maybe"}) + "\n")
    waiting.unlock()
    return ids


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(case, tmp_path, tiny_model_dir, capsys, request):
    if case.ray:
        request.getfixturevalue("ray_local")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(to_dict(tiny_config(tiny_model_dir))))
    ids = _runs(tmp_path, tiny_model_dir)
    _write(tmp_path, case.files, ids)
    names = dict(cfg=tmp_path / "tiny.yaml", dir=tmp_path, model=tiny_model_dir, run=tmp_path / "new-run",
                 waiting=tmp_path / "waiting", done=tmp_path / "done")
    argv = [arg.format(**names) for arg in shlex.split(case.argv)]
    before = _snapshot(tmp_path)
    capsys.readouterr()

    code = main(argv)

    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("deft: error:")]
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert len(errors) == 1, err
    expected = case.expected
    for i, e in enumerate(ids):
        expected = expected.replace(f"@id{i}@", e)
    assert expected in err, err
    assert "Traceback" not in out + err
    assert _snapshot(tmp_path) == before  # no half-made run, no debris, no file touched


def test_the_corpus_is_large_and_every_id_is_unique():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
