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
