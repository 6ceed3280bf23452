"""The gain sweep's comparison (benchmarks/ppo_gain_sweep.py): variants against the shipped settings, seed by seed."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ppo_gain_sweep as sweep  # noqa: E402


def test_variants_are_compared_with_demo_seed_by_seed():
    gains = {
        "demo": {1: (0.10, 0.03), 2: (-0.02, 0.03), 3: (0.05, 0.03)},
        "fast": {1: (0.04, 0.03), 2: (-0.05, 0.03), 3: (0.08, 0.03)},
    }
    demo, fast = sweep.compare(gains)
    assert demo["mean"] == pytest.approx(0.13 / 3) and "diff" not in demo
    assert fast["seeds"] == {1: 0.04, 2: -0.05, 3: 0.08}
    # paired differences −0.06, −0.03, +0.03: mean −0.02, SE = stdev / √3
    assert fast["diff"] == pytest.approx(-0.02)
    assert fast["diff_se"] == pytest.approx(0.045825757 / 3**0.5)


def test_a_seed_the_baseline_did_not_run_is_not_paired():
    gains = {"demo": {1: (0.1, 0.0)}, "fast": {1: (0.3, 0.0), 2: (5.0, 0.0)}}
    fast = sweep.compare(gains)[1]
    assert fast["diff"] == pytest.approx(0.2) and fast["diff_se"] is None


@pytest.mark.parametrize("text", ["no-equals", '={"lr": 1}', "x=not json", "x=[1]"])
def test_a_malformed_variant_is_refused_with_its_text(text):
    with pytest.raises(SystemExit, match="variant"):
        sweep.parse_variant(text)


def test_a_variant_parses_to_its_overrides():
    assert sweep.parse_variant('epochs-1={"ppo_epochs": 1, "lr": 2e-4}') == ("epochs-1", {"ppo_epochs": 1, "lr": 2e-4})
