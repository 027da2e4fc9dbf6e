"""Config composition, precedence and validation, in-process (no subprocess, no model)."""

import pytest

from rlhf_cli.__main__ import _rewrite_override, config_file_overrides, group_options, split_argv
from rlhf_cli.schema import ConfigError, UserError, build_config
from rlhf_cli.stages.common import compose, validate_overrides


def _typed(*overrides, config_file=None):
    groups = group_options()
    file_overrides = config_file_overrides(str(config_file), groups) if config_file else []
    args = file_overrides + [_rewrite_override(o, groups) for o in overrides]
    return build_config("sft", compose("sft", args))


def test_stage_defaults_compose_into_the_schema():
    config = _typed()
    assert config.model.name_or_path == "embedded:smollm2-135m"
    assert config.quant.mode == "auto" and config.lora.r == 16 and config.data.path == "demo-sft"
    assert config.optim.lr == pytest.approx(2e-4)


def test_precedence_defaults_then_file_then_command_line(tmp_path):
    user = tmp_path / "my.yaml"
    user.write_text("lora:\n  r: 8\n  alpha: 64\noptim:\n  lr: 1.0e-3\nquant: nf4\n")
    config = _typed("lora.r=4", config_file=user)
    assert config.lora.r == 4  # command line beats the file
    assert config.lora.alpha == 64  # the file beats the defaults
    assert config.optim.lr == pytest.approx(1e-3)
    assert config.quant.mode == "nf4"  # a top-level group name selects the group option
    assert config.lora.dropout == pytest.approx(0.05)  # defaults kept where the file is silent


def test_shipped_preset_by_name():
    config = _typed(config_file="demo")
    assert config.train.max_steps == 40 and config.samples.num_prompts == 4


def test_path_values_for_model_and_data_groups(tmp_path):
    config = _typed(f"model={tmp_path}", "data=some/file.jsonl")
    assert config.model.name_or_path == str(tmp_path) and config.data.path == "some/file.jsonl"


def test_flags_may_appear_anywhere():
    flags, overrides, config = split_argv(
        ["optim.lr=1", "-m", "config=x.yaml", "lora.r=2", "--cfg", "job"]
    )
    assert flags == ["-m", "--cfg", "job"]
    assert overrides == ["optim.lr=1", "lora.r=2"] and config == "x.yaml"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1e-4", "Unknown config key 'optim.lrr': did you mean 'optim.lr'?"),
        ("lora.rank=4", "did you mean 'lora.r'?"),
        ("optim.lr=abc", "optim.lr='abc' has the wrong type: expected a float"),
        (
            "optim.lr=-1e-4",
            "optim.lr=-0.0001 is not valid: the learning rate must be greater than 0",
        ),
        ("lora.r=0", "lora.r=0 is not valid: the LoRA rank must be a positive integer"),
        ("quant=fp3", "Could not find 'quant/fp3'; available options are: auto, int8, nf4, none"),
        ("device=tpu", "device='tpu' is not valid: choose one of auto, cuda, cpu"),
        ("train.batch_size=0", "train.batch_size=0 is not valid"),
        ("data.truncation=cut", "choose one of truncate, drop"),
    ],
)
def test_bad_values_give_one_sentence(override, message):
    with pytest.raises(ConfigError) as err:
        validate_overrides("sft", [_rewrite_override(override, group_options())])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_every_value_of_a_sweep_is_checked():
    validate_overrides("sft", ["++optim.lr=1e-4,3e-4", "++lora.r=8,16"])
    with pytest.raises(ConfigError, match="lora.r=0"):
        validate_overrides("sft", ["++optim.lr=1e-4,3e-4", "++lora.r=8,0"])


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        config_file_overrides(str(tmp_path / "nope.yaml"), group_options())
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        config_file_overrides(str(bad), group_options())
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(UserError, match="not a mapping"):
        config_file_overrides(str(scalar), group_options())
