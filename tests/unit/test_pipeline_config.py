"""Win-rate statistics of `rlhf eval`, and how pipeline configs are read and refused."""

import pytest

from rlhf.config import ConfigError, PipelineConfig
from rlhf.pipeline import load_pipeline, stage_config
from rlhf.stages.evaluate import compare, win_rate


def test_win_rate_counts_ties_half_and_brackets_the_rate():
    outcomes = [1.0] * 30 + [0.5] * 10 + [0.0] * 20
    w = win_rate(outcomes, seed=0)
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (30, 10, 20, 60)
    assert w["rate"] == pytest.approx(35 / 60)
    assert w["low"] < w["rate"] < w["high"]
    # a 95% interval of a mean of 60 outcomes with sd ≈ 0.46: about ±0.12 wide
    assert 0.15 < w["high"] - w["low"] < 0.30
    assert win_rate([1.0] * 10, seed=0)["low"] == 1.0
    assert win_rate(outcomes, seed=0) == win_rate(outcomes, seed=0)  # seeded: the report is reproducible


def test_compare_says_how_b_did():
    assert compare(0.1, 0.3) == 1.0 and compare(0.3, 0.1) == 0.0 and compare(0.2, 0.2) == 0.5


def test_presets_load_and_every_section_builds():
    for preset in ("tiny", "demo"):
        pc, sections = load_pipeline(preset, {"out": "elsewhere"})
        assert isinstance(pc, PipelineConfig) and pc.out == "elsewhere"
        for name in sections:
            wiring = {"ppo": {"reward": "x"}, "rm": {"library": "x.db"}}.get(name, {})
            stage_config(sections, name, **wiring)  # raises on an unknown or mistyped field


def test_pipeline_refuses_unknown_fields_and_sections_that_set_the_wiring(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: 2\nppo:\n  kl_coeff: 0.1\n")
    _, sections = load_pipeline(str(bad), {})
    with pytest.raises(ConfigError, match="kl_coeff"):
        stage_config(sections, "ppo", reward="x")
    with pytest.raises(ConfigError, match="sets \\['reward'\\], which the pipeline sets itself"):
        stage_config({"ppo": {"reward": "mine"}}, "ppo", reward="x")
    with pytest.raises(ConfigError, match="neither a preset"):
        load_pipeline(str(tmp_path / "missing.yaml"), {})
    zero = tmp_path / "zero.yaml"
    zero.write_text("rounds: 0\n")
    with pytest.raises(ConfigError, match="rounds"):
        load_pipeline(str(zero), {})
