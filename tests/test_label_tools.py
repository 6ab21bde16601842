"""Human labelling through Label Studio and Argilla: export with the model's answer and the acquisition
score, import by content from files shaped exactly like each tool's export (tests/fixtures: Label Studio's
documented task format; Argilla's from the real SDK, see make_argilla_fixtures.py), majority vote, resume.
"""
import json
from pathlib import Path
from xml.etree import ElementTree

import pytest

from pipeline.cli import main as deft
from pipeline.io import read_parquet
from pipeline.label_formats import argilla_records, decide, label_studio_config, read_items
from pipeline.loop import ActiveLearningRun, NeedsLabels
from pipeline.run_dir import RunDir
from pipeline.tasks import demo, gsm8k

from test_loop import loop_config, scorer  # noqa: F401  (the module's long-lived scorers)

FIXTURES = Path(__file__).parent / "fixtures"


def from_fixture(name: str, ids: list[str], round: int, out: Path) -> Path:
    """A fixture with the round's example ids (and round) put in for the @idN@ placeholders."""
    text = (FIXTURES / name).read_text()
    for i, e in enumerate(ids):
        text = text.replace(f"@id{i}@", e)
    out.write_text(text.replace('"deft_round": 0', f'"deft_round": {round}'))
    return out


def votes(path):
    kind, items, problems = read_items(path)
    return kind, {i.example_id: i.votes for i in items}, problems


# ---- the formats, without a run --------------------------------------------------------------------
def test_label_studio_export_fixture_reads_every_annotation_and_skips_cancelled_ones(tmp_path):
    kind, got, problems = votes(from_fixture("label_studio_export.json", ["a", "b", "c", "d"], 0, tmp_path / "ls.json"))
    assert kind == "label-studio" and not problems
    assert got == {"a": ["true", "true"], "b": ["false", "true", "false"], "c": ["true"], "d": ["false"]}


def test_argilla_flat_export_counts_only_submitted_responses(tmp_path):
    kind, got, problems = votes(from_fixture("argilla_flat.jsonl", ["a", "b", "c", "d"], 0, tmp_path / "ag.jsonl"))
    assert kind == "argilla" and not problems
    assert got == {"a": ["true", "true"], "b": ["false", "true", "false"], "c": ["true"], "d": []}


def test_argilla_nested_export_and_to_disk_folder(tmp_path):
    """The nested form has no per-response status: a completed record's responses all count (so the
    draft on the third record makes a tie, which decide() reports), a pending record's none."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    from_fixture("argilla_nested.json", ["a", "b", "c", "d"], 0, folder / "records.json")
    for path in (folder, folder / "records.json"):
        kind, got, problems = votes(path)
        assert kind == "argilla" and not problems
        assert got == {"a": ["true", "true"], "b": ["false", "true", "false"], "c": ["true", "false"], "d": []}
    items = read_items(folder)[1]
    decisions, problems = decide(items, ["a", "b", "c", "d"], 0, demo(), folder)
    assert {e: (d.label, d.annotators, round(d.agreement, 2)) for e, d in decisions.items()} == {
        "a": ("true", 2, 1.0), "b": ("false", 3, 0.67)}
    assert len(problems) == 1 and "a tie between 'true', 'false'" in problems[0] and "'c'" in problems[0]


def test_exports_are_what_each_tool_takes():
    config = ElementTree.fromstring(label_studio_config(demo()))
    choices = config.find("Choices")
    assert config.find("Text").get("value") == "$prompt" and choices.get("toName") == "prompt"
    assert [c.get("value") for c in choices.findall("Choice")] == ["true", "false"]
    assert ElementTree.fromstring(label_studio_config(gsm8k())).find("TextArea").get("name") == "label"
    nested = json.loads((FIXTURES / "argilla_nested.json").read_text())[0]
    from pipeline.label_formats import ExportRow
    ours = argilla_records([ExportRow("x", "p", 0.3, "true", 0.8)], 2)[0]
    assert set(ours) == set(nested) - {"_server_id"}  # the keys Record.to_dict() writes and from_dict reads
    assert ours["suggestions"]["label"] == {"value": "true", "score": 0.8, "agent": "deft round 2"}
    assert ours["metadata"] == {"example_id": "x", "deft_round": 2, "acquisition_score": 0.3}


# ---- through the loop ------------------------------------------------------------------------------
def test_label_studio_then_argilla_rounds_end_to_end(tiny_model_dir, scorer, tmp_path, capsys):  # noqa: F811
    """Round 0 is labelled in Label Studio (the base model's answers as predictions), round 1 in Argilla
    (the round-0 adapter's answers as suggestions); both by several annotators, then resume to the end."""
    cfg = loop_config(tiny_model_dir, al={"oracle": "human", "rounds": 2, "initial_size": 4, "batch_size": 4})
    path = tmp_path / "run"
    with pytest.raises(NeedsLabels):
        ActiveLearningRun(cfg, path, scorer=scorer).run()
    rd = RunDir(path)

    assert deft(["label", "export", str(path), "--format", "label-studio"]) == 0
    tasks_file = rd.round_dir(0) / "to_label.label-studio.json"
    tasks = json.loads(tasks_file.read_text())
    ids = [t["data"]["example_id"] for t in tasks]
    assert ids == read_parquet(rd.selected_file(0)).column("example_id").to_pylist()
    fixture_data = json.loads((FIXTURES / "label_studio_export.json").read_text())[0]["data"]
    assert all(set(t["data"]) == set(fixture_data) for t in tasks)
    selected0 = {r["example_id"]: r["score"] for r in read_parquet(rd.selected_file(0)).to_pylist()}
    for t in tasks:  # STAR scored the pool with the base model in round 0: its answers are the pre-annotations
        (prediction,) = t["predictions"]
        assert prediction["model_version"] == "deft round 0" and prediction["score"] == selected0[t["data"]["example_id"]]
        assert prediction["result"][0]["value"]["choices"][0] in ("true", "false")
    assert (rd.round_dir(0) / "to_label.label-studio.label_config.xml").is_file()
    assert deft(["label", "export", str(path), "--format", "label-studio"]) == 0  # the same again: fine

    export = from_fixture("label_studio_export.json", ids, 0, tmp_path / "project-3-at-2026.json")
    assert deft(["label", "import", str(path), str(export)]) == 0
    out = capsys.readouterr().out
    assert "imported 4 labels (label-studio; up to 3 annotators a row, 1 row(s) decided by majority)" in out
    imported = read_parquet(rd.imported_file(0)).to_pylist()
    assert [(r["label"], r["annotators"]) for r in imported] == [("true", 2), ("false", 3), ("true", 1), ("false", 1)]

    with pytest.raises(NeedsLabels):
        ActiveLearningRun.open(path, scorer=scorer).resume()  # round 0 trains; round 1 waits
    assert deft(["label", "export", str(path), "--format", "argilla", "--out", str(tmp_path / "r1.json")]) == 0
    records = json.loads((tmp_path / "r1.json").read_text())
    selected = {r["example_id"]: r["score"] for r in read_parquet(rd.selected_file(1)).to_pylist()}
    scores = {r["example_id"]: r for r in read_parquet(rd.scores_file(1)).to_pylist()}
    ids1 = [r["id"] for r in records]
    assert list(selected) == ids1
    for r in records:  # the adapter's own answer, its confidence, and the score that picked the row
        assert r["suggestions"]["label"] == {"value": scores[r["id"]]["prediction"], "score": scores[r["id"]]["confidence"],
                                             "agent": "deft round 1"}
        assert r["suggestions"]["label"]["value"] in ("true", "false") and 0.5 <= r["suggestions"]["label"]["score"] <= 1
        assert r["metadata"]["acquisition_score"] == selected[r["id"]]

    stale = from_fixture("argilla_flat.jsonl", ids1, 0, tmp_path / "stale.jsonl")  # round 0's file
    assert deft(["label", "import", str(path), str(stale)]) == 2
    assert "was exported for round 0; this run is waiting for round 1's labels" in capsys.readouterr().err
    export = from_fixture("argilla_flat.jsonl", ids1, 1, tmp_path / "argilla.jsonl")
    assert deft(["label", "import", str(path), str(export)]) == 0  # the discarded 4th row stays unlabelled
    assert "3 of 4 labelled for round 1" in capsys.readouterr().out
    with pytest.raises(NeedsLabels, match="1 of 4 examples need labels"):
        ActiveLearningRun.open(path, scorer=scorer).resume()
    assert deft(["label", "import", str(path), str(export), "--allow-partial"]) == 0
    ActiveLearningRun.open(path, scorer=scorer).resume()
    labeled = {r["example_id"]: (r["label"], r["round_added"]) for r in rd.read_labeled().to_pylist()}
    assert labeled == {**{e: (l, 0) for e, l in zip(ids, ["true", "false", "true", "false"])},
                       **{e: (l, 1) for e, l in zip(ids1[:3], ["true", "false", "true"])}}
    assert rd.read_state().phase == "done"
