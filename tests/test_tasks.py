"""Each task's prompt, label parsing and answer extraction."""
import pytest

from pipeline.config import ConfigError, TaskConfig
from pipeline.tasks import BadRow, boolq, demo, get_task, gsm8k, normalize_number, obqa

BOOLQ_ROW = {
    "question": "Please answer the following question with true or false, question: is the sky blue?\n\nAnswer format: true/false",
    "answer": "the correct answer is true",
}
OBQA_ROW = {"question": "The sun is responsible for\nAnswerA puppies\nAnswerB plants sprouting\nThe correct answer is ", "answer": "B"}
GSM_ROW = {"question": "Tom has 3 apples and buys 1,200 more. How many?", "answer": "3 + 1200 = <<3+1200=1203>>1203\n#### 1,203"}


def test_boolq():
    ex = boolq().example(BOOLQ_ROW)
    assert ex["prompt"].endswith("Answer format: true/false\nthe correct answer is")
    assert ex["label"] == "true"
    assert ex["target"] == " true"
    assert boolq().parse_label("False") == "false"
    with pytest.raises(BadRow, match="not in the label set"):
        boolq().parse_label("the correct answer is maybe")


def test_obqa_moves_the_trailing_space_into_the_label_word():
    ex = obqa().example(OBQA_ROW)
    assert ex["prompt"].endswith("The correct answer is")
    assert (ex["label"], ex["target"]) == ("B", " B")
    with pytest.raises(BadRow, match="not in the label set"):
        obqa().example({**OBQA_ROW, "answer": "E"})


def test_gsm8k_label_and_extraction():
    task = gsm8k()
    ex = task.example(GSM_ROW)
    assert ex["prompt"] == "Question: Tom has 3 apples and buys 1,200 more. How many?\nAnswer:"
    assert ex["label"] == "1203"
    assert ex["target"].startswith(" 3 + 1200") and ex["target"].endswith("#### 1,203")
    assert task.extract("so the total is 12 + 3 = 15.\n#### 15") == "15"
    assert task.extract("He pays $1,250.00 in total.") == "1250"  # no "####": the last number
    assert task.extract("I do not know") is None
    assert task.is_correct(task.extract("#### 1203"), ex["label"])
    with pytest.raises(BadRow, match="no answer matching"):
        task.example({**GSM_ROW, "answer": "no final number"})


@pytest.mark.parametrize("text,expected", [("1,203", "1203"), ("$5", "5"), ("-3.50", "-3.5"), ("7.0", "7"), ("12.", "12")])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_missing_and_empty_fields_name_the_field():
    with pytest.raises(BadRow, match="field 'question': missing"):
        boolq().example({"answer": "true"})
    with pytest.raises(BadRow, match="field 'question': empty text"):
        boolq().example({"question": "  ", "answer": "true"})
    with pytest.raises(BadRow, match="field 'answer': missing"):
        boolq().example({"question": "q"})
    assert boolq().example({"question": "q"}, require_label=False)["label"] is None


def test_demo_task_uses_true_false():
    assert demo().labels == ("true", "false")


def test_custom_verbalizer_task_from_config():
    cfg = TaskConfig(
        name="custom", input_fields=["premise", "hypothesis"], answer_field="gold",
        prompt_template="{premise}\nHypothesis: {hypothesis}\nEntailed?", labels=["yes", "no"],
    )
    task = get_task(cfg)
    ex = task.example({"premise": "It rains.", "hypothesis": "It is wet.", "gold": "yes"})
    assert ex["prompt"] == "It rains.\nHypothesis: It is wet.\nEntailed?"
    assert (ex["label"], ex["target"]) == ("yes", " yes")


def test_custom_generation_task_from_config():
    cfg = TaskConfig(name="custom", kind="generation", prompt_template="Q: {question}\nA:", answer_regex=r"ANSWER: (\w+)")
    task = get_task(cfg)
    assert task.example({"question": "capital of France?", "answer": "ANSWER: Paris"})["label"] == "Paris"
    assert task.extract("I think ANSWER: Paris") == "Paris"


def test_custom_task_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="task.labels"):
        TaskConfig(name="custom", labels=["only"])
    with pytest.raises(ConfigError, match="task.label_words"):
        TaskConfig(name="custom", labels=["a", "b"], label_words=[" a"])
    with pytest.raises(ConfigError, match=r"prompt_template uses \['passage'\]"):
        get_task(TaskConfig(name="custom", labels=["a", "b"], prompt_template="{passage} {question}"))
