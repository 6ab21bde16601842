"""Tasks: how a raw row becomes a prompt, what the answer space is, and how a prediction is scored.

Two kinds:
  verbalizer  one next-token distribution over fixed label words ("true"/"false", "A".."D");
  generation  a free-text answer from which a value is extracted (GSM8K: the number after "####").
"""
from __future__ import annotations

import dataclasses
import re
import string
from dataclasses import dataclass
from typing import Optional

from pipeline.config import ConfigError, TaskConfig

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


class BadRow(ValueError):
    """A row cannot be used; `field` names the offending column."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field '{field}': {message}")
        self.field = field


@dataclass(frozen=True)
class Task:
    name: str
    input_fields: tuple[str, ...]
    answer_field: str
    prompt_template: str

    kind = "abstract"

    def prompt(self, row: dict) -> str:
        values = {}
        for f in self.input_fields:
            v = row.get(f)
            if v is None:
                raise BadRow(f, "missing")
            if not isinstance(v, str):
                raise BadRow(f, f"should be text, got {type(v).__name__}")
            if not v.strip():
                raise BadRow(f, "empty text")
            values[f] = v
        # Trailing whitespace would split from the answer's first BPE token ("is " + "A" vs "is" + " A").
        return self.prompt_template.format(**values).rstrip()

    def example(self, row: dict, require_label: bool = True) -> dict:
        """{prompt, label, target} for one raw row; label/target are None when the row is unlabelled."""
        prompt = self.prompt(row)
        answer = row.get(self.answer_field)
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            if require_label:
                raise BadRow(self.answer_field, "missing" if answer is None else "empty text")
            return {"prompt": prompt, "label": None, "target": None}
        if not isinstance(answer, str):
            answer = str(answer)
        label = self.parse_label(answer)
        return {"prompt": prompt, "label": label, "target": self.target(label, answer)}

    def parse_label(self, answer: str) -> str:
        raise NotImplementedError

    def target(self, label: str, answer: str) -> str:
        """The text trained after the prompt."""
        raise NotImplementedError

    def is_correct(self, prediction: Optional[str], label: str) -> bool:
        return prediction is not None and prediction == label


@dataclass(frozen=True)
class VerbalizerTask(Task):
    labels: tuple[str, ...] = ()
    label_words: tuple[str, ...] = ()  # what the model emits for each label, usually with a leading space

    kind = "verbalizer"

    def parse_label(self, answer: str) -> str:
        """Exact label, or the answer's last word ("the correct answer is true" -> "true")."""
        text = answer.strip()
        candidates = [text] + ([text.split()[-1].strip(".,;:!\"'()")] if text.split() else [])
        for c in candidates:
            for label in self.labels:
                if c.lower() == label.lower():
                    return label
        raise BadRow(self.answer_field, f"label {answer!r} is not in the label set {list(self.labels)}")

    def target(self, label: str, answer: str) -> str:
        return self.label_words[self.labels.index(label)]


@dataclass(frozen=True)
class GenerationTask(Task):
    answer_regex: str = r"####\s*(-?\$?\d[\d,]*(?:\.\d+)?)"
    max_new_tokens: int = 256

    kind = "generation"

    def parse_label(self, answer: str) -> str:
        m = re.search(self.answer_regex, answer)
        if m is None:
            raise BadRow(self.answer_field, f"no answer matching {self.answer_regex!r} in {answer[-60:]!r}")
        return normalize_number(m.group(1))

    def target(self, label: str, answer: str) -> str:
        return " " + answer.strip()

    def extract(self, generated: str) -> Optional[str]:
        """The predicted value: the regex match if the model wrote one, else the last number it wrote."""
        m = re.search(self.answer_regex, generated)
        if m is not None:
            return normalize_number(m.group(1))
        numbers = _NUMBER.findall(generated)
        return normalize_number(numbers[-1]) if numbers else None


def normalize_number(text: str) -> str:
    """'$1,200.00' -> '1200'; '-3.50' -> '-3.5'. Non-numbers come back stripped."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return t
    return str(int(value)) if value == int(value) else repr(value)


def boolq() -> VerbalizerTask:
    return VerbalizerTask(
        name="boolq",
        input_fields=("question",),
        answer_field="answer",
        prompt_template="{question}\nthe correct answer is",
        labels=("true", "false"),
        label_words=(" true", " false"),
    )


def obqa() -> VerbalizerTask:
    # The published prompts end in "The correct answer is " (trailing space); the space moves into the label
    # word so the answer is one BPE token.
    return VerbalizerTask(
        name="obqa",
        input_fields=("question",),
        answer_field="answer",
        prompt_template="{question}",
        labels=("A", "B", "C", "D"),
        label_words=(" A", " B", " C", " D"),
    )


def gsm8k(max_new_tokens: int = 256) -> GenerationTask:
    return GenerationTask(
        name="gsm8k",
        input_fields=("question",),
        answer_field="answer",
        prompt_template="Question: {question}\nAnswer:",
        max_new_tokens=max_new_tokens,
    )


def demo() -> VerbalizerTask:
    """The generated number-comparison task (see pipeline.demo): BoolQ's format under its own name."""
    return dataclasses.replace(boolq(), name="demo")


def get_task(cfg: TaskConfig) -> Task:
    """The task named by the config; `custom` builds one from the config's fields."""
    if cfg.name == "boolq":
        return boolq()
    if cfg.name == "obqa":
        return obqa()
    if cfg.name == "gsm8k":
        return gsm8k(cfg.max_new_tokens)
    if cfg.name == "demo":
        return demo()
    fields = {f for _, f, _, _ in string.Formatter().parse(cfg.prompt_template) if f}
    if not fields <= set(cfg.input_fields):
        raise ConfigError(f"task.prompt_template uses {sorted(fields - set(cfg.input_fields))}, which are not in task.input_fields {cfg.input_fields}")
    if cfg.kind == "generation":
        kwargs = {"answer_regex": cfg.answer_regex} if cfg.answer_regex else {}
        return GenerationTask(
            name="custom",
            input_fields=tuple(cfg.input_fields),
            answer_field=cfg.answer_field,
            prompt_template=cfg.prompt_template,
            max_new_tokens=cfg.max_new_tokens,
            **kwargs,
        )
    words = cfg.label_words or [" " + label for label in cfg.labels]
    return VerbalizerTask(
        name="custom",
        input_fields=tuple(cfg.input_fields),
        answer_field=cfg.answer_field,
        prompt_template=cfg.prompt_template,
        labels=tuple(cfg.labels),
        label_words=tuple(words),
    )
