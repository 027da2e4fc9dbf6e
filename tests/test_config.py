"""Config composition, precedence and validation, in-process (no subprocess, no model)."""

import pytest

from rlhf_cli.cli.args import (
    _rewrite_override,
    build_overrides,
    config_file_overrides,
    group_options,
    split_argv,
)
from rlhf_cli.cli.validate import validate_overrides
from rlhf_cli.compose import compose
from rlhf_cli.schema import ConfigError, UserError, build_config


def _typed(*overrides, config_file=None):
    args = build_overrides(
        str(config_file) if config_file else None, list(overrides), group_options()
    )
    return build_config("sft", compose("sft", args))


def test_stage_defaults_compose_into_the_schema():
    config = _typed()
    assert config.model.name_or_path == "embedded:smollm2-135m"
    assert config.quant.mode == "auto" and config.lora.r == 16 and config.data.path == "demo-sft"
    assert config.optim.lr == pytest.approx(2e-4)  # exact: a parsed decimal (approx's default ok)


def test_precedence_defaults_then_file_then_command_line(tmp_path):
    user = tmp_path / "my.yaml"
    user.write_text("lora:\n  r: 8\n  alpha: 64\noptim:\n  lr: 1.0e-3\nquant: nf4\n")
    config = _typed("lora.r=4", config_file=user)
    assert config.lora.r == 4  # command line beats the file
    assert config.lora.alpha == 64  # the file beats the defaults
    assert config.optim.lr == pytest.approx(1e-3)  # exact: a parsed decimal (approx's default ok)
    assert config.quant.mode == "nf4"  # a top-level group name selects the group option
    # defaults kept where the file is silent; exact: a parsed decimal
    assert config.lora.dropout == pytest.approx(0.05)


def test_shipped_preset_by_name():
    config = _typed(config_file="demo")
    assert config.train.max_steps == 40 and config.samples.num_prompts == 4


@pytest.mark.parametrize(
    ("stage", "preset", "check"),
    [
        (
            "reward",
            "demo-reward",
            lambda c: c.train.max_steps == 20 and c.reward.norm_samples == 128,
        ),
        ("dpo", "demo-dpo", lambda c: c.train.max_steps == 20 and c.data.path == "demo-prefs"),
        ("ppo", "demo-ppo", lambda c: c.train.max_steps == 4 and c.rollout.max_new_tokens == 24),
        ("eval", "demo-eval", lambda c: c.kl_prompts == 64 and c.generation.batch_size == 64),
    ],
)
def test_make_demo_presets_compose_for_their_stages(stage, preset, check):
    """The presets `make demo` passes to each stage are valid configs of that stage."""
    extra = ["reward.from=runs/demo/reward/final"] if stage == "ppo" else []
    args = build_overrides(preset, extra, group_options())
    config = build_config(stage, compose(stage, args))
    assert config.model.name_or_path == "embedded:smollm2-135m" and check(config)


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
    validate_overrides("sft", ["++optim.lr=1e-4,3e-4", "++lora.r=8,16"], multirun=True)
    with pytest.raises(ConfigError, match="lora.r=0"):
        validate_overrides("sft", ["++optim.lr=1e-4,3e-4", "++lora.r=8,0"], multirun=True)


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


def test_backslashes_and_quotes_in_file_values_survive(tmp_path):
    user = tmp_path / "my.yaml"
    user.write_text(
        "data:\n  eval_path: 'C:\\data\\it''s.jsonl'\nmodel:\n  chat_template: '{{ ''\\n'' }}\\'\n"
    )
    config = _typed(config_file=user)
    assert config.data.eval_path == "C:\\data\\it's.jsonl"
    assert config.model.chat_template == "{{ '\\n' }}\\"


def test_a_group_chosen_on_the_command_line_beats_the_files_choice(tmp_path):
    user = tmp_path / "my.yaml"
    user.write_text(f"model: {tmp_path}\ndata: my.jsonl\nquant: nf4\n")
    config = _typed("data=demo-sft", "model=smollm2-135m", config_file=user)
    assert config.data.path == "demo-sft" and config.model.name_or_path == "embedded:smollm2-135m"
    assert (
        config.quant.mode == "nf4"
    )  # what the command line did not choose still comes from the file


@pytest.mark.parametrize(
    "content", ["hydra:\n  job:\n    chdir: true\n", "optim:\n  _target_: os.system\n"]
)
def test_config_files_may_not_run_code(tmp_path, content):
    user = tmp_path / "evil.yaml"
    user.write_text(content)
    with pytest.raises(UserError, match="which would run code"):
        config_file_overrides(str(user), group_options())


def test_a_sweep_needs_multirun_and_a_group_error_lists_only_options():
    with pytest.raises(ConfigError, match="is a sweep; add -m"):
        validate_overrides("sft", ["++optim.lr=1e-4,3e-4"])
    with pytest.raises(ConfigError) as err:
        validate_overrides("sft", ["quant=fp3"])
    assert str(err.value).endswith("available options are: auto, int8, nf4, none.")


def test_info_takes_its_optional_value():
    flags, overrides, _ = split_argv(["--info", "defaults", "lora.r=4"])
    assert flags == ["--info", "defaults"] and overrides == ["lora.r=4"]
    flags, overrides, _ = split_argv(["--info", "lora.r=4"])
    assert flags == ["--info"] and overrides == ["lora.r=4"]


def test_resume_command_is_the_users_command_with_the_output_dir_pinned(monkeypatch):
    import shlex

    from rlhf_cli.cli.run import COMMAND_ENV, resume_command

    typed = ["rlhf", "sft", "config=my.yaml", "optim.lr=1e-4", "output_dir=runs/x", "resume=false"]
    monkeypatch.setenv(COMMAND_ENV, shlex.join(typed))  # as `rlhf` records it for its processes
    assert (
        resume_command("sft", "/abs/runs/x dir")
        == "rlhf sft config=my.yaml optim.lr=1e-4 'output_dir=/abs/runs/x dir'"
    )


# ---------------------------------------------------------------- one source of defaults
def _dataclasses_of(schema, seen=None):
    """Every dataclass a stage schema is built from (itself, its sub-configs, their bases)."""
    import dataclasses
    import typing

    seen = seen if seen is not None else {}
    for klass in schema.__mro__:
        if dataclasses.is_dataclass(klass) and klass not in seen:
            seen[klass] = None
            hints = typing.get_type_hints(klass)
            for f in dataclasses.fields(klass):
                for sub in (hints[f.name], *typing.get_args(hints[f.name])):
                    if dataclasses.is_dataclass(sub):
                        _dataclasses_of(sub, seen)
    return list(seen)


def test_the_schema_holds_no_defaults_so_the_yaml_is_the_only_source():
    """A default in a dataclass would be a second copy of a YAML value (they drifted before:
    optim.lr 2e-4 in the schema vs 2e-5 in dpo.yaml; ppo.minibatches 1 vs 2)."""
    import dataclasses

    from rlhf_cli.schema import STAGE_SCHEMAS

    with_defaults = [
        f"{klass.__name__}.{f.name}"
        for schema in STAGE_SCHEMAS.values()
        for klass in _dataclasses_of(schema)
        for f in dataclasses.fields(klass)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert with_defaults == []


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "kto", "ppo", "grpo", "eval", "sample"])
def test_every_stage_yaml_sets_every_key_of_its_schema(stage):
    """The shipped YAML alone gives a complete config: a key the YAML forgets fails here as a
    missing mandatory value, with every model preset and logger."""
    from rlhf_cli.schema import DEFAULT_MODEL

    rewards = {
        "ppo": "reward.fn=ppo_rewards:colour_share",
        "grpo": "reward.fns=[ppo_rewards:colour_share]",
    }
    extra = [rewards[stage]] if stage in rewards else []
    assert build_config(stage, compose(stage, extra)).model.name_or_path == DEFAULT_MODEL
    for model in group_options()["model"]:
        build_config(stage, compose(stage, [*extra, f"model={model}"]))
    if stage != "sample":
        for logger in group_options()["logger"]:
            build_config(stage, compose(stage, [*extra, f"logger={logger}"]))


def test_the_label_yaml_sets_every_key():
    from rlhf_cli.labeling import parse_command_line

    _, config, _ = parse_command_line([])
    assert config.ties == "drop" and config.pairs == "all" and config.in_ is None


# ---------------------------------------------------------------- --cfg job and --help
@pytest.mark.parametrize("flag", [["--cfg", "job"], ["--help"]])
def test_cfg_job_and_help_print_even_when_a_required_value_is_missing(flag, capsys):
    """`rlhf ppo --cfg job` printed nothing but the error (reward.from / reward.fn unset): the
    config is how a user learns what to set. It prints, names what is missing, and exits 0."""
    from conftest import run_in_process

    assert run_in_process(["ppo", *flag]) == 0
    out, err = capsys.readouterr()
    assert "missing_eos_penalty" in out and "kl:" in out  # the composed config
    assert "a run needs a value this config leaves unset: reward.from and reward.fn" in err
    # with the value given there is nothing to say; a bad value is still an error
    assert run_in_process(["ppo", *flag, "reward.fn=ppo_rewards:colour_share"]) == 0
    assert "leaves unset" not in capsys.readouterr().err
    assert run_in_process(["ppo", "--cfg", "job", "ppo.epochs=0"]) == 2
    assert "ppo.epochs=0 is not valid" in capsys.readouterr().err
