"""Typed, validated configuration. YAML is only its serialization: unknown keys are errors.

Every error names the dotted field and the bad value, e.g. "scoring.mc_passes should be >= 1, got 0".
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ConfigError(ValueError):
    """A config value is wrong; the message names the field."""


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


@dataclass
class ModelConfig:
    name: str = SMOLLM2_ID  # HF id or local dir; the SmolLM2 id falls back to the offline PyPI copy
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA/AMX CPUs, else fp32
    trust_remote_code: bool = False  # off unless asked: remote code runs arbitrary Python
    attention_dropout: float = 0.0  # >0 also drops attention in MC passes (Llama has no other dropout)
    max_length: int = 512  # prompt+answer tokens; longer prompts are truncated from the left
    cache_dir: Optional[str] = None  # where converted weights live; default $DEFT_CACHE or ~/.cache/deft
    allow_download: bool = False  # fetch model.name from the Hugging Face hub; off: local dirs and the HF cache only

    def __post_init__(self):
        _require(bool(self.name), "model.name should be a HF id or a directory, got ''")
        _require(0.0 <= self.attention_dropout < 1.0, f"model.attention_dropout should be in [0, 1), got {self.attention_dropout}")
        _require(self.max_length >= 8, f"model.max_length should be >= 8, got {self.max_length}")


@dataclass
class LoraConfig:
    r: int = 64  # paper: rank 64
    alpha: int = 16  # paper: alpha 16
    dropout: float = 0.1  # dropout on the LoRA input; also what MC passes switch on
    target_modules: Optional[list[str]] = None  # None: q,k,v,o + MLP projections for the architecture

    def __post_init__(self):
        _require(self.r > 0, f"lora.r should be positive, got {self.r}")
        _require(self.alpha > 0, f"lora.alpha should be positive, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, f"lora.dropout should be in [0, 1), got {self.dropout}")


@dataclass
class TaskConfig:
    name: Literal["boolq", "obqa", "gsm8k", "demo", "custom"] = "boolq"
    # Only for name=custom:
    kind: Literal["verbalizer", "generation"] = "verbalizer"
    input_fields: list[str] = field(default_factory=lambda: ["question"])
    answer_field: str = "answer"
    prompt_template: str = "{question}\nAnswer:"
    labels: list[str] = field(default_factory=list)  # verbalizer: the label set, as it appears in answer_field
    label_words: list[str] = field(default_factory=list)  # verbalizer: text the model emits for each label
    answer_regex: str = ""  # generation: regex whose group 1 is the answer; default "#### <number>"
    max_new_tokens: int = 256  # generation: greedy answer length

    def __post_init__(self):
        _require(self.max_new_tokens >= 1, f"task.max_new_tokens should be >= 1, got {self.max_new_tokens}")
        if self.name != "custom":
            return
        _require(self.answer_field not in self.input_fields,
                 f"task.answer_field '{self.answer_field}' is also in task.input_fields {self.input_fields}: "
                 "the prompt would contain the answer")
        _check_template(self.prompt_template, self.input_fields)
        if self.answer_regex:
            try:
                groups = re.compile(self.answer_regex).groups
            except re.error as e:
                raise ConfigError(f"task.answer_regex is not a valid regular expression ({e}): {self.answer_regex!r}") from None
            _require(groups >= 1, f"task.answer_regex needs a group around the answer, e.g. '####\\s*(\\d+)'; "
                                  f"got {self.answer_regex!r}")
        if self.kind != "verbalizer":
            return
        _require(len(self.labels) >= 2, f"task.labels should list at least 2 labels for a verbalizer task, got {self.labels}")
        _require(len(set(self.labels)) == len(self.labels), f"task.labels should be distinct, got {self.labels}")
        _require(
            not self.label_words or len(self.label_words) == len(self.labels),
            f"task.label_words should have one word per label ({len(self.labels)}), got {self.label_words}",
        )

    @property
    def task_kind(self) -> str:
        """verbalizer or generation, known from the config alone."""
        return "generation" if self.name == "gsm8k" or (self.name == "custom" and self.kind == "generation") else "verbalizer"


def _check_template(template: str, input_fields: list[str]) -> None:
    """task.prompt_template may only name input fields, by name ({question}), and must name at least one."""
    try:
        parsed = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"task.prompt_template is not a valid template ({e}); write literal braces as {{{{ }}}}: "
                          f"{template!r}") from None
    _require(all(f and not f.isdigit() for f in parsed),
             f"task.prompt_template has a positional field {{}}: name the input field instead, e.g. {{{input_fields[0]}}}")
    names = {f.split(".")[0].split("[")[0] for f in parsed}
    _require(names <= set(input_fields),
             f"task.prompt_template uses {sorted(names - set(input_fields))}, which are not in task.input_fields {input_fields}")
    _require(bool(names), f"task.prompt_template names no input field: every prompt would be the same. Got {template!r}")
    _require(all(f in input_fields for f in parsed),
             f"task.prompt_template fields are plain names: got {sorted(set(parsed) - set(input_fields))}")


@dataclass
class DataConfig:
    path: str = "demo"  # JSONL/Parquet/CSV file, "hf:<id>[:<config>]:<split>", or "demo"
    test_path: Optional[str] = None  # evaluation split, same forms
    id_field: Optional[str] = None  # column holding a stable id; default: a hash of the row's content
    on_bad_row: Literal["error", "skip"] = "error"  # skip: drop bad rows, count and report them
    limit: Optional[int] = None  # use only the first N good rows
    demo_size: int = 400  # rows of the generated demo pool
    allow_download: bool = False  # load an "hf:" dataset from the hub; off: only what the datasets cache holds
    # Where validated pools are kept as Parquet (scorers read prompts from there): default $DEFT_CACHE or
    # ~/.cache/deft. On a multi-node cluster it must be storage that every node sees.
    cache_dir: Optional[str] = None

    def __post_init__(self):
        _require(self.limit is None or self.limit > 0, f"data.limit should be positive, got {self.limit}")
        _require(self.demo_size >= 1, f"data.demo_size should be >= 1, got {self.demo_size}")


CPU_SCORING_BATCH, GPU_SCORING_BATCH = 16, 128


@dataclass
class ScoringConfig:
    mc_passes: int = 3  # T, the paper's value
    # Rows per forward pass; the pool is length-sorted into blocks of this size. None: 16 on CPU, 128 on a GPU
    # (measured on an H100: 572 vs 75 rows/s for SmolLM2-135M, where each forward costs the same ~70 ms of
    # kernel dispatch at either size; on 2 CPU cores larger blocks only add padding).
    batch_size: Optional[int] = None
    num_actors: Optional[int] = None  # None: the resource plan decides
    # Verbalizer tasks: a block's common prompt prefix (>= 32 tokens: a long instruction, few-shot examples)
    # runs once per pass and its keys/values serve every row. Its MC dropout mask is then shared by the rows
    # of the block (actors/scorer.py). false: every row runs its whole prompt.
    share_prefix: bool = True

    def __post_init__(self):
        _require(self.mc_passes >= 1, f"scoring.mc_passes should be >= 1, got {self.mc_passes}")
        _require(self.batch_size is None or self.batch_size >= 1, f"scoring.batch_size should be >= 1, got {self.batch_size}")
        _require(self.num_actors is None or self.num_actors >= 1, f"scoring.num_actors should be >= 1, got {self.num_actors}")

    def batch_size_on(self, gpu: bool) -> int:
        """The configured batch size, or the device's default."""
        return self.batch_size or (GPU_SCORING_BATCH if gpu else CPU_SCORING_BATCH)


@dataclass
class TrainConfig:
    """Constraint LoRA. Regularisation is on by default (B decay 0.5, LoRA dropout in `lora`).

    The defaults are the small-model recipe (SmolLM2-135M-class models, few labels) chosen by measurement
    (benchmarks/recipe.py, README "Does it save labels?"): few labels make few optimizer steps, so
    `min_steps` puts a floor under them, and each round continues from the last round's adapter
    (`warm_start`), so the steps add up over rounds. Retrained from scratch with the same steps, about half
    of the demo's adapters only learned the class prior. lr 1e-3, not 3e-3: a warm-started round starts a
    fresh AdamW, and at 3e-3 its first steps could throw a trained adapter off (one round's training loss
    went 0.6 -> 2.7 -> 15 in three steps) onto the class prior. Over 3 seeds on 2 AMD EPYC cores, 2 random
    demo runs ended at the prior (0.42) at 3e-3 and none at 1e-3, whose mean curve never fell (README "Does
    it save labels?"). `preset: paper` restores the STAR paper's 7B
    recipe (fresh adapter per round, 3 epochs at 1.5e-4); fields set beside a preset override it.
    """

    PRESETS: ClassVar[dict] = {
        # STAR (arXiv 2403.01165) for LLaMA-2-7B-class models: 3 epochs at 1.5e-4, batch 8, no step floor.
        "paper": {"epochs": 3, "lr": 1.5e-4, "batch_size": 8, "min_steps": 0, "warmup_ratio": 0.0,
                  "weight_decay_b": 0.5, "schedule": "linear", "loss": "lm", "warm_start": False},
    }

    preset: Optional[str] = None  # paper: the STAR paper's recipe; None: the defaults below
    epochs: int = 1
    min_steps: int = 32  # at least this many optimizer steps per round (more epochs over a tiny set)
    lr: float = 1e-3
    batch_size: int = 8  # global batch, split over the workers
    schedule: Literal["linear", "constant"] = "linear"
    warmup_ratio: float = 0.1
    weight_decay_b: float = 0.5  # L2 (decoupled) decay on LoRA B only: keeps the adapter calibrated
    weight_decay_a: float = 0.0  # none on A
    label_smoothing: float = 0.0
    # lm: cross-entropy of the answer tokens over the whole vocabulary (the STAR paper's loss).
    # verbalizer: cross-entropy over the label words only, at the answer position: exactly the distribution
    # that scoring and evaluation read (PET / LM-BFF prompt-based fine-tuning); verbalizer tasks only.
    # Measured on the demo (README "Does it save labels?"), it did not beat lm, so lm stays the default.
    loss: Literal["lm", "verbalizer"] = "lm"
    max_grad_norm: float = 1.0
    warm_start: bool = True  # start from the last round's adapter (False: a fresh adapter every round)
    zero_stage: int = 2  # 3 shards parameters too; slower on CPU
    num_workers: Optional[int] = None  # None: the resource plan decides
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPUs that support it, fp32 on CPU
    backend: Literal["ray", "local"] = "ray"  # ray: Ray Train + DeepSpeed; local: the same recipe in-process

    def __post_init__(self):
        _require(self.preset is None or self.preset in self.PRESETS,
                 f"train.preset should be one of {sorted(self.PRESETS)}, got {self.preset!r}")
        _require(self.epochs >= 1, f"train.epochs should be >= 1, got {self.epochs}")
        _require(self.min_steps >= 0, f"train.min_steps should be >= 0, got {self.min_steps}")
        _require(self.lr > 0, f"train.lr should be positive, got {self.lr}")
        _require(self.batch_size >= 1, f"train.batch_size should be >= 1, got {self.batch_size}")
        _require(0.0 <= self.warmup_ratio < 1.0, f"train.warmup_ratio should be in [0, 1), got {self.warmup_ratio}")
        _require(self.weight_decay_b >= 0, f"train.weight_decay_b should be >= 0, got {self.weight_decay_b}")
        _require(self.weight_decay_a >= 0, f"train.weight_decay_a should be >= 0, got {self.weight_decay_a}")
        _require(0.0 <= self.label_smoothing < 1.0, f"train.label_smoothing should be in [0, 1), got {self.label_smoothing}")
        _require(self.loss in ("lm", "verbalizer"), f"train.loss should be lm or verbalizer, got {self.loss!r}")
        _require(self.zero_stage in (2, 3), f"train.zero_stage should be 2 or 3, got {self.zero_stage}")
        _require(self.num_workers is None or self.num_workers >= 1, f"train.num_workers should be >= 1, got {self.num_workers}")

    def epochs_for(self, n: int) -> int:
        """Epochs over n labelled rows: `epochs`, or more if that is what reaching `min_steps` takes."""
        steps_per_epoch = -(-n // self.batch_size)
        return max(self.epochs, -(-self.min_steps // max(1, steps_per_epoch)))


STRATEGY_NAMES = ("random", "star", "subtract", "entropy", "pe", "least_confidence", "margin", "bald")
MEASURE_STRATEGIES = ("entropy", "pe", "least_confidence", "margin", "bald")  # each ranks by its own column
MEASURE_NAMES = ("auto", "entropy", "me", "pe", "least_confidence", "margin", "bald")
CLASS_MEASURES = ("margin", "bald")  # need a class distribution: verbalizer tasks only


@dataclass
class ActiveLearningConfig:
    strategy: str = "star"  # random, star, subtract, entropy (ME), pe, least_confidence, margin, bald
    measure: str = "auto"  # only for star/subtract: what they mix; auto: entropy (verbalizer) or pe (generation)
    initial: Literal["random", "base_uncertainty"] = "random"  # how round 0 (cold start) picks
    initial_size: int = 32  # b0
    batch_size: int = 32  # b, labels per later round
    rounds: int = 4  # rounds including the cold start
    budget: Optional[int] = None  # stop once this many labels exist
    oracle: Literal["simulated", "human"] = "simulated"
    lambda_start: float = 0.1  # STAR: after adapter i, λ = min(lambda_max, lambda_start + lambda_step * i)
    lambda_step: float = 0.1
    lambda_max: float = 1.0
    lambda_values: list[float] = field(default_factory=list)  # explicit λ per adapter index; overrides the above
    eval_limit: Optional[int] = None  # evaluate on the first N test rows only
    ece_bins: int = 15
    evaluate_base: bool = True  # also evaluate the base model once, as the 0-label point of the curve
    # Candidate sampling for large pools (as in baal and small-text): each round scores a seeded random
    # subset of this many unlabelled rows, not the whole pool, and selects among them. Faster rounds at
    # some cost in selection quality; None scores the whole pool.
    candidates: Optional[int] = None
    base_on_full_pool: bool = True  # STAR/subtract: u_base over the whole pool (once, cached) or candidates only

    def __post_init__(self):
        _require(self.strategy in STRATEGY_NAMES, f"al.strategy should be one of {list(STRATEGY_NAMES)}, got {self.strategy!r}")
        _require(self.measure in MEASURE_NAMES, f"al.measure should be one of {list(MEASURE_NAMES)}, got {self.measure!r}")
        _require(self.initial_size >= 1, f"al.initial_size should be >= 1, got {self.initial_size}")
        _require(self.batch_size >= 1, f"al.batch_size should be >= 1, got {self.batch_size}")
        _require(self.rounds >= 1, f"al.rounds should be >= 1, got {self.rounds}")
        _require(self.budget is None or self.budget >= self.initial_size,
                 f"al.budget should be >= al.initial_size ({self.initial_size}), got {self.budget}")
        _require(10 <= self.ece_bins <= 15, f"al.ece_bins should be in [10, 15], got {self.ece_bins}")
        _require(self.eval_limit is None or self.eval_limit > 0, f"al.eval_limit should be positive, got {self.eval_limit}")
        for v in self.lambda_values:
            _require(0.0 <= v <= 1.0, f"al.lambda_values should be in [0, 1], got {v}")
        _require(self.candidates is None or self.candidates >= max(self.initial_size, self.batch_size),
                 f"al.candidates should be >= the labels a round asks for (al.initial_size {self.initial_size}, "
                 f"al.batch_size {self.batch_size}), got {self.candidates}")


@dataclass
class SelfTrainingConfig:
    """LiST (arXiv 2110.06274) self-training after each round's gold training; defaults from the authors'
    code (GPU-sized: 6 sessions x 1,000 steps). `preset: small` is sized for the embedded model on 2 CPU
    cores; fields set beside a preset override it."""

    PRESETS: ClassVar[dict] = {
        # Measured on 2 CPU cores with SmolLM2-135M (README "Self-training"): one round in minutes. 96 steps,
        # not 32: a fresh student distilling a 0.91 demo teacher (benchmarks.distillation) reached 0.89 in 96
        # steps but stayed at the base model's 0.42 in 32, and the gold fine-tune did not repair it (0.71).
        "small": {"sessions": 1, "steps": 96, "batch_size": 8, "meta_batch": 4, "lr": 1.0e-3},
    }

    preset: Optional[str] = None
    enabled: bool = False
    sessions: int = 6  # teacher -> student promotions per round
    steps: int = 1000  # student steps on pseudo-labels per session
    warmup_fraction: float = 0.6  # distillation warm-up: uniform weights for this share of the steps
    batch_size: int = 16  # pseudo-labelled rows per step (global, split over the workers)
    meta_batch: int = 4  # gold rows per meta step
    lr: float = 1.0e-4  # student AdamW (weight decay 0, linear schedule)
    meta_lr: float = 5.0e-6  # the virtual SGD step of meta re-weighting
    # Beyond LiST (which filters nothing): pseudo-label only rows whose teacher confidence >= this.
    min_confidence: Optional[float] = None
    # Beyond LiST: a teacher whose pseudo-labels are all one class has only the class prior to teach, and
    # a student distilled from it starts the gold fine-tune from that prior (on the demo such a round ended
    # at 0.42, the base model's accuracy). Such a session is skipped and the teacher stays the adapter.
    skip_one_class: bool = True
    # Beyond LiST: a teacher whose pseudo-labels say almost nothing about their rows is skipped the same way.
    # What they say is the mutual information I(x; y) = H(mean p) - mean H(p) of the teacher's soft labels
    # p, as a share of ln K (the most a K-class label can carry). It is 0 when every row gets the same
    # distribution, unsure (0.5/0.5) or sure of one class, and 1 when every row gets a sure, balanced
    # answer. On the demo (3 seeds, 32-label rounds) the three teachers whose students ended their round at
    # the class prior carried 0.02%, 0.10% and 1.2% (the last one scored 0.87 itself, at mean confidence
    # 0.55); the four whose students kept or raised accuracy carried 15-91%. 5% lies between; it was chosen
    # from those seven teachers, not tried on others.
    min_teacher_information: Optional[float] = 0.05

    def __post_init__(self):
        _require(self.preset is None or self.preset in self.PRESETS,
                 f"self_training.preset should be one of {sorted(self.PRESETS)}, got {self.preset!r}")
        _require(self.sessions >= 1, f"self_training.sessions should be >= 1, got {self.sessions}")
        _require(self.steps >= 1, f"self_training.steps should be >= 1, got {self.steps}")
        _require(0.0 <= self.warmup_fraction <= 1.0, f"self_training.warmup_fraction should be in [0, 1], got {self.warmup_fraction}")
        _require(self.batch_size >= 1, f"self_training.batch_size should be >= 1, got {self.batch_size}")
        _require(self.meta_batch >= 1, f"self_training.meta_batch should be >= 1, got {self.meta_batch}")
        _require(self.lr > 0, f"self_training.lr should be positive, got {self.lr}")
        _require(self.meta_lr > 0, f"self_training.meta_lr should be positive, got {self.meta_lr}")
        _require(self.min_confidence is None or 0.0 <= self.min_confidence < 1.0,
                 f"self_training.min_confidence should be in [0, 1), got {self.min_confidence}")
        _require(self.min_teacher_information is None or 0.0 <= self.min_teacher_information < 1.0,
                 f"self_training.min_teacher_information should be in [0, 1) or null, got {self.min_teacher_information}")


# Ray's longest socket path under its temp dir is "/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store"
# (about 63 bytes), and a Unix socket path has at most 107.
MAX_RAY_TEMP_DIR = 107 - 64


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: RAY_ADDRESS, else an embedded local Ray
    num_cpus: Optional[int] = None  # embedded Ray only; None: all cores
    temp_dir: Optional[str] = None  # embedded Ray's session files
    scorer_cpus: float = 0.25  # logical CPUs a long-lived scorer holds; small so Ray Train can still start
    storage_path: Optional[str] = None  # Ray Train checkpoints; None: inside the run dir. Shared storage on multi-node

    def __post_init__(self):
        _require(0.0 <= self.scorer_cpus, f"cluster.scorer_cpus should be >= 0, got {self.scorer_cpus}")
        _require(self.temp_dir is None or len(os.path.abspath(self.temp_dir)) <= MAX_RAY_TEMP_DIR,
                 f"cluster.temp_dir is too long for Ray ({len(os.path.abspath(self.temp_dir or ''))} characters; at most "
                 f"{MAX_RAY_TEMP_DIR}): Ray puts Unix sockets under it, and a socket path has at most 107 bytes")
        _require(self.num_cpus is None or self.num_cpus >= 1,
                 f"cluster.num_cpus should be >= 1 (nothing can be scheduled on 0 CPUs), got {self.num_cpus}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    al: ActiveLearningConfig = field(default_factory=ActiveLearningConfig)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    seed: int = 0

    def __post_init__(self):
        _require(self.seed >= 0, f"seed should be >= 0, got {self.seed}")
        check_strategy(self.al, self.task.task_kind, self.scoring.mc_passes)
        _require(not (self.train.loss == "verbalizer" and self.task.task_kind == "generation"),
                 "train.loss verbalizer needs a verbalizer task; a generation task trains with train.loss lm")
        if self.self_training.enabled:
            _require(self.task.task_kind == "verbalizer",
                     "self_training.enabled needs a verbalizer task (LiST soft-labels over the label words); "
                     "a generation task has no label distribution to distil")
            _require(self.train.zero_stage == 2,
                     "self_training.enabled needs train.zero_stage 2: meta re-weighting differentiates through "
                     "whole LoRA tensors, which ZeRO-3 shards")


def check_strategy(al: ActiveLearningConfig, task_kind: str, mc_passes: int) -> None:
    """Refuse strategy/measure combinations that would silently rank by something else, or by zeros."""
    strategy, measure = al.strategy, al.measure
    mixes = strategy in ("star", "subtract")
    _require(mixes or measure in ("auto", strategy),
             f"al.measure={measure} has no effect with al.strategy={strategy}: a measure strategy ranks by its own "
             f"measure, and al.measure only chooses what star/subtract mix. Drop al.measure, or use al.strategy={measure}")
    own = measure if mixes else strategy
    _require(not (task_kind == "generation" and own in CLASS_MEASURES),
             f"{'al.measure' if mixes else 'al.strategy'}={own} needs a class distribution, but this task is a generation "
             "task; choose entropy, pe or least_confidence")
    _require(not (mixes and measure == "bald"),
             f"al.measure=bald is meaningless for al.strategy={strategy}: the base model is scored in one deterministic "
             "pass, so its BALD is 0 everywhere; choose entropy, pe, least_confidence or margin")
    _require(not (own == "bald" and al.initial == "base_uncertainty"),
             "al.initial=base_uncertainty cannot rank by BALD: the base model's one deterministic pass gives BALD 0 "
             "everywhere; use al.initial=random")
    _require(not (strategy == "bald" and mc_passes < 2),
             f"al.strategy=bald needs scoring.mc_passes >= 2 (BALD is 0 with one pass), got {mc_passes}")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        _require(isinstance(value, dict), f"{where} should be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            _require(type(None) in args, f"{where} should not be empty")
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is Literal:
        _require(value in args, f"{where} should be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        _require(isinstance(value, (list, tuple)), f"{where} should be a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        _require(isinstance(value, bool), f"{where} should be true or false, got {value!r}")
        return value
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), f"{where} should be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text; it is plainly a number
            try:
                value = float(value)
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{where} should be a number, got {value!r}")
        return float(value)
    if tp is str:
        _require(not isinstance(value, bool), f"{where} should be a string, got {value!r}: YAML reads yes/no/true/false/"
                 "on/off as booleans; quote it, e.g. 'true'")
        _require(isinstance(value, str), f"{where} should be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError naming the field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    presets = getattr(cls, "PRESETS", None)
    if presets and data.get("preset") is not None:  # a preset's values first, the explicit keys over them
        _require(data["preset"] in presets, f"{where}.preset should be one of {sorted(presets)}, got {data['preset']!r}")
        data = {**presets[data["preset"]], **data}
    for key in data:
        _require(key in names, f"unknown config key '{where + '.' if where else ''}{key}' (known: {sorted(names)})")
    kwargs = {k: _coerce(hints[k], v, f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


# Keys added after run directories existed, with the value that keeps such a run doing what it did: a frozen
# config.yaml without one is read with this value, not today's default, so a resumed (or compared) run goes
# on as it started. Both are LiST guards that skip sessions; before them, every session was distilled.
ADDED_KEYS = {("self_training", "skip_one_class"): False, ("self_training", "min_teacher_information"): None}


def frozen_config(data: dict) -> Config:
    """A run's config.yaml as a Config, keys it predates (ADDED_KEYS) set to what the run was doing."""
    data = copy.deepcopy(data)
    for (section, key), then in ADDED_KEYS.items():
        if isinstance(data.get(section), dict) and key not in data[section]:
            data[section][key] = then
    return from_dict(Config, data)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'scoring.mc_passes=5' -> (['scoring', 'mc_passes'], 5); the value is parsed as YAML, and text that
    is not valid YAML ('{question} {answer}') is taken as the plain string it was meant to be."""
    key, sep, raw = text.partition("=")
    _require(bool(sep) and bool(key), f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            _require(isinstance(node, dict), f"--set {text}: '{part}' is not a section")
        node[path[-1]] = value
    return data


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read YAML (or start from defaults when path is None), apply `key=value` overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        _require(p.is_file(), f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        _require(isinstance(data, dict), f"{p}: the top level should be a mapping")
    data = apply_overrides(data, overrides or [])
    return from_dict(Config, data)


# What `deft resume RUN --set KEY=VALUE` may change: where things are and how the work is spread, never
# what the run measures. A section name allows every key in it.
RESUME_KEYS = ("data.path", "data.test_path", "data.cache_dir", "model.name", "model.cache_dir", "cluster", "scoring.batch_size",
               "scoring.num_actors", "train.backend", "train.num_workers")


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_KEYS)


def resume_config(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` (a run's frozen config) with `overrides` applied; a key that would change what the run measures
    is refused, naming the keys that may change."""
    for text in overrides:
        path, _ = parse_override(text)
        key = ".".join(path)
        _require(_resumable(key),
                 f"--set {key}: cannot change in a run that has started (it changes what the run measures); start a "
                 f"new run instead. A resume may change: {', '.join(k + ('.*' if '.' not in k else '') for k in RESUME_KEYS)}")
    return from_dict(Config, apply_overrides(to_dict(cfg), overrides))


def resume_hint(error: Exception, run: str | Path) -> str:
    """What to do when a run's frozen config no longer works: the key named first in the error, if a resume
    may change it."""
    key = str(error).split(":", 1)[0].strip()
    if key.startswith("--set"):
        return "The run is unchanged."
    if "." in key and " " not in key and _resumable(key):
        return f"The run is unchanged. Fix it, or point the run elsewhere: deft resume {run} --set {key}=..."
    return "The run is unchanged; this config cannot change mid-run. Fix the file it names, or start a new run."
