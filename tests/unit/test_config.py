import pytest

from rlhf.cli import build_parser, config_from_args
from rlhf.config import ConfigError, SFTConfig, build, field_docs


def test_every_field_is_documented():
    docs = field_docs(SFTConfig)
    import dataclasses

    missing = [f.name for f in dataclasses.fields(SFTConfig) if not docs.get(f.name)]
    assert missing == []


def test_build_checks_names_types_and_constraints():
    assert build(SFTConfig, {"lr": 1, "adam_betas": [0.9, 0.99]}).lr == 1.0
    with pytest.raises(ConfigError, match=r"unknown SFTConfig field\(s\) \['lrr'\]"):
        build(SFTConfig, {"lrr": 1})
    with pytest.raises(ConfigError, match="SFTConfig.epochs must be float"):
        build(SFTConfig, {"epochs": "two"})
    with pytest.raises(ConfigError, match="schedule must be one of"):
        build(SFTConfig, {"schedule": "step"})
    with pytest.raises(ConfigError, match=r"batch_size \(6\) must be a multiple of micro_batch_size \(4\)"):
        build(SFTConfig, {"batch_size": 6})


def test_precedence_default_then_yaml_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("sft:\n  lr: 0.001\n  epochs: 3\n")
    args = build_parser().parse_args(["sft", "--config", str(tmp_path / "c.yaml"), "--epochs", "5", "--lora"])
    cfg = config_from_args(SFTConfig, args, "sft")
    assert (cfg.lr, cfg.epochs, cfg.lora, cfg.batch_size) == (0.001, 5.0, True, SFTConfig.batch_size)


@pytest.mark.parametrize("stage", ["sft", "sample", "annotate", "filter", "rm", "ppo", "eval", "pipeline"])
def test_help_of_every_stage_prints_every_field(stage, capsys):
    # field docs are help text, which argparse %-formats: a doc saying "±20%" once crashed `rlhf ppo --help`
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([stage, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "(default: " in out
    if stage == "ppo":
        assert "±20% of its error" in " ".join(out.split())
