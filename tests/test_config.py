"""Config: typed, validated at construction, unknown keys rejected, errors naming the field."""
import pytest

from pipeline.config import Config, ConfigError, load_config


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
