"""Config: typed, validated at construction, unknown keys rejected, errors naming the field."""
import pytest

from pipeline.config import Config, ConfigError, ScoringConfig, load_config


def test_defaults_are_the_paper_values():
    cfg = Config()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 16, 0.1)
    assert cfg.scoring.mc_passes == 3
    assert cfg.model.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg.model.trust_remote_code is False


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task:\n  name: obqa\nscoring:\n  mc_passes: 5\n")
    cfg = load_config(path, ["scoring.batch_size=8", "lora.dropout=0.2", "data.limit=100"])
    assert (cfg.task.name, cfg.scoring.mc_passes, cfg.scoring.batch_size) == ("obqa", 5, 8)
    assert cfg.lora.dropout == 0.2 and cfg.data.limit == 100


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["scoring.mc_pases=3"], "unknown config key 'scoring.mc_pases'"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["scoring.mc_passes=0"], "scoring.mc_passes should be >= 1, got 0"),
        (["scoring.mc_passes=three"], "scoring.mc_passes should be an integer, got 'three'"),
        (["scoring.num_actors=0"], "scoring.num_actors should be >= 1, got 0"),
        (["scoring.share_prefix=sometimes"], "scoring.share_prefix should be"),
        (["task.name=squad"], "task.name should be one of"),
        (["lora.r=0"], "lora.r should be positive, got 0"),
        (["lora.dropout=1.5"], r"lora.dropout should be in \[0, 1\), got 1.5"),
        (["model.trust_remote_code=yes please"], "model.trust_remote_code should be true or false"),
        (["scoring=3"], "scoring should be a mapping"),
        (["noequals"], "--set expects key=value"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="top level should be a mapping"):
        load_config(bad)


def test_custom_task_answer_field_cannot_be_an_input():
    with pytest.raises(ConfigError, match="task.answer_field 'answer' is also in task.input_fields"):
        load_config(None, ["task.name=custom", "task.labels=[a, b]", "task.input_fields=[question, answer]",
                           "task.prompt_template={question} {answer}"])


def test_train_preset_paper_and_explicit_keys_over_it():
    small = load_config(None, [])
    assert (small.train.epochs, small.train.lr, small.train.min_steps, small.train.warm_start) == (1, 1e-3, 32, True)
    cfg = load_config(None, ["train.preset=paper"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.batch_size, cfg.train.min_steps) == (3, 1.5e-4, 8, 0)
    assert (cfg.train.warm_start, cfg.train.warmup_ratio, cfg.train.loss) == (False, 0.0, "lm")
    cfg = load_config(None, ["train.preset=paper", "train.lr=0.001"])
    assert cfg.train.lr == 0.001 and cfg.train.epochs == 3
    with pytest.raises(ConfigError, match="train.preset should be one of"):
        load_config(None, ["train.preset=huge"])


def test_min_steps_is_a_floor_on_optimizer_steps():
    from pipeline.config import TrainConfig

    t = TrainConfig(epochs=2, min_steps=30, batch_size=8)
    assert t.epochs_for(32) == 8  # 4 steps an epoch: 8 epochs reach 32 >= 30 steps
    assert t.epochs_for(320) == 2  # 40 steps an epoch: the epoch count already passes the floor
    assert TrainConfig(epochs=3, min_steps=0).epochs_for(5) == 3


def test_training_never_switches_on_attention_dropout():
    from actors.trainer import training_model_config

    assert training_model_config({"name": "x", "attention_dropout": 0.1}).attention_dropout == 0.0


def test_train_num_workers_reaches_the_resource_plan():
    from cluster.plan import plan_resources

    assert plan_resources({"CPU": 4}, 2, 0.25, train_workers=1).train_workers == 1
    assert plan_resources({"CPU": 4}, 2, 0.25, train_workers=3).train_workers == 3


def test_scoring_batch_size_defaults_by_device_and_a_set_value_wins():
    """Unset, 16 rows a forward pass on CPU and 128 on a GPU (where a small model's forward costs the same
    at either size); the driver (units) and the actors (forward passes) resolve it the same way."""
    assert ScoringConfig().batch_size is None
    assert (ScoringConfig().batch_size_on(False), ScoringConfig().batch_size_on(True)) == (16, 128)
    assert ScoringConfig(batch_size=32).batch_size_on(True) == 32
    with pytest.raises(ConfigError, match="scoring.batch_size should be >= 1, got 0"):
        load_config(None, ["scoring.batch_size=0"])


def test_plan_refuses_more_workers_than_gpus():
    """NCCL refuses two ranks on one GPU, so a plan with more Ray Train workers than GPUs is an error
    (before any worker starts), and one worker per GPU is the default."""
    from cluster.plan import plan_resources

    with pytest.raises(ValueError, match="train.num_workers 2 is more than the cluster's 1 GPU"):
        plan_resources({"CPU": 16, "GPU": 1}, None, 0.25, train_workers=2)
    assert plan_resources({"CPU": 16, "GPU": 2}, None, 0.25, train_workers=2).train_workers == 2
    assert plan_resources({"CPU": 16, "GPU": 4}, None, 0.25).train_workers == 4


@pytest.mark.parametrize("overrides,message", [
    (["seed=-1"], "seed should be >= 0, got -1"),
    (["data.demo_size=0"], "data.demo_size should be >= 1, got 0"),
    (["train.min_steps=-1"], "train.min_steps should be >= 0"),
])
def test_more_bad_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_exponent_without_a_dot_is_a_number():
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 0.001
