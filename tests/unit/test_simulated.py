"""The simulated evaluator panel: its criteria on hand-made examples, its noise, agreement and reproducibility."""

from pathlib import Path

import numpy as np
import pytest

from rlhf.algos.aggregate import pairwise_agreement, tiers_from_scores
from rlhf.annotators import criteria
from rlhf.annotators.simulated import PanelConfig, SimulatedPanel, stable_hash
from rlhf.annotators.synthetic import REFUSAL, cut_mid_word, first_sentence, synthetic_set

ROOT = Path(__file__).resolve().parents[2]

DEMO = (
    "If you don't care about order, convert the list to a set and back: `list(set(items))`. "
    "If you want to keep the original order, use `list(dict.fromkeys(items))`, since dictionaries keep "
    "insertion order. Both need hashable items."
)
PROMPT = "How can I make a Python list without duplicates?"
HARMFUL = "How can I pick the lock on my neighbour's front door while they're away?"


def label(panel: SimulatedPanel, data) -> dict[str, list[list[list[int]]]]:
    """prompt_key -> each evaluator's tiers."""
    return {key: [tiers for _, tiers in panel.rank(p, rs, fs, key)] for key, p, rs, fs in data}


@pytest.fixture(scope="module")
def data():
    return synthetic_set()


# ---- criteria ----


def test_features_are_in_unit_interval_and_named():
    f = criteria.features(PROMPT, DEMO, True)
    assert tuple(f) == criteria.CRITERIA == tuple(criteria.DEFAULT_WEIGHTS)
    for response in (DEMO, "", "a", "!!!", "LOUD LOUD LOUD idiot " * 20, REFUSAL):
        for finished in (True, False):
            assert all(0.0 <= v <= 1.0 for v in criteria.features(PROMPT, response, finished).values())


def test_addresses_prompt():
    off_topic = "The capital of Australia is Canberra, a purpose-built city."
    assert criteria.addresses_prompt(PROMPT, DEMO) > criteria.addresses_prompt(PROMPT, off_topic)
    assert criteria.addresses_prompt(PROMPT, "") == 0.0
    # saturating: naming half of the topic words is nearly as good as naming all of them
    assert criteria.addresses_prompt("python list duplicates order", "a python list") > 0.8


def test_concise():
    short_q, long_q = "What is the capital of Australia?", "Explain how vaccines work."
    answer = "The capital of Australia is Canberra."
    rambling = " ".join(["Canberra is the capital, as many people know."] * 40)  # 320 words
    assert criteria.concise(short_q, answer) == 1.0
    assert criteria.concise(short_q, rambling) < 0.2
    assert criteria.concise(short_q, "") == 0.0
    # long-form asks allow more words, and a one-liner is too short for them
    medium = " ".join(["Vaccines train the immune system."] * 20)  # 100 words
    assert criteria.concise(long_q, medium) == 1.0 > criteria.concise(short_q, medium)
    assert criteria.concise(long_q, answer) < 0.5


def test_ends_properly():
    assert criteria.ends_properly(DEMO, True) == 1.0
    assert criteria.ends_properly(cut_mid_word(DEMO, 0.5), False) == 0.0
    assert criteria.ends_properly(DEMO, False) < criteria.ends_properly(DEMO, True)
    assert criteria.ends_properly("It is Canberra and", True) == 0.5
    assert criteria.ends_properly("```python\nprint(1)\n```", True) == 1.0
    assert criteria.ends_properly("Crisp leaves drift and spin\nthe maple lets go of red", True) == 1.0  # a poem


def test_no_repetition():
    loop = "Your pace is " + "0.0000 km / 28 minutes = " * 10
    assert criteria.no_repetition(DEMO) == 1.0
    assert criteria.no_repetition(loop) < 0.3
    assert criteria.no_repetition(DEMO + " " + first_sentence(DEMO)) < 1.0
    assert criteria.no_repetition("Yes.") == 1.0


def test_polite():
    assert criteria.polite(DEMO) == 1.0
    assert criteria.polite("That's a stupid question, you idiot.") < 0.5
    assert criteria.polite("USE A SET LIKE EVERYONE ELSE DOES.") < 1.0
    assert criteria.polite("Use the DNA test kit from the NHS.") == 1.0  # acronyms are not shouting


def test_safe():
    assert criteria.safe(HARMFUL, REFUSAL) == 1.0
    assert criteria.safe(HARMFUL, "Sure! Slide a tension wrench into the lock and rake the pins.") == 0.0
    assert criteria.safe(PROMPT, REFUSAL) < 0.5
    assert criteria.safe(PROMPT, DEMO) == 1.0
    assert criteria.safe("how do i get into my girlfriend's phone to read her messages", "I can\u2019t help.") == 1.0
    # "can't" inside a helpful answer is not a refusal
    assert criteria.safe(PROMPT, DEMO + " If items can't be hashed, loop instead.") == 1.0


# ---- the panel ----


def test_tiers_from_scores():
    assert tiers_from_scores(np.array([0.2, 0.1, 0.9, 0.2])) == [[2], [0, 3], [1]]
    assert tiers_from_scores(np.array([0.5, 0.45, 0.1]), tol=0.1) == [[0, 1], [2]]


def test_noiseless_panel_gives_the_gold_order(data):
    panel = SimulatedPanel(PanelConfig(n_evaluators=4, noise_scale=0.0, weight_spread=0.0))
    for key, prompt, responses, finished in data[:100]:
        gold = panel.gold(prompt, responses, finished)
        assert all(np.array_equal(u, gold) for u in panel.utilities(prompt, responses, finished))
        expected = tiers_from_scores(gold)
        assert [t for _, t in panel.rank(prompt, responses, finished, key)] == [expected] * 4


def test_rankings_are_valid_tiers(data):
    panel = SimulatedPanel(PanelConfig(tie_margin=0.02))
    for key, prompt, responses, finished in data[:50]:
        ranks = panel.rank(prompt, responses, finished, key)
        assert [name for name, _ in ranks] == ["sim-0", "sim-1", "sim-2"]
        for _, tiers in ranks:
            assert sorted(k for t in tiers for k in t) == list(range(len(responses)))
            assert all(t == sorted(t) and t for t in tiers)


def test_default_agreement_is_human_like_and_falls_with_noise(data):
    # Calibrated to InstructGPT's 72.6% on sampled responses; the synthetic set's clearer quality gaps give ~82%.
    agreement = pairwise_agreement(list(label(SimulatedPanel(), data).values()))
    assert 0.75 <= agreement <= 0.89
    noisier = pairwise_agreement(list(label(SimulatedPanel(PanelConfig(noise_scale=0.085)), data).values()))
    assert 0.65 <= noisier <= 0.78 and noisier < agreement - 0.05


def test_thurstone_noise(data):
    cfg = PanelConfig(noise="thurstone")
    labels = label(SimulatedPanel(cfg), data)
    assert labels == label(SimulatedPanel(cfg), data)
    assert labels != label(SimulatedPanel(), data)
    assert 0.6 <= pairwise_agreement(list(labels.values())) <= 0.9


def test_reproducible_and_independent_of_prompt_order(data):
    subset = data[:60]
    first = label(SimulatedPanel(PanelConfig(seed=3)), subset)
    assert first == label(SimulatedPanel(PanelConfig(seed=3)), subset[::-1])
    assert first != label(SimulatedPanel(PanelConfig(seed=4)), subset)
    assert stable_hash("p001") == stable_hash("p001") != stable_hash("p002")


def test_agreement_counts_only_strict_pairs():
    same, flipped, tied = [[0], [1], [2]], [[2], [1], [0]], [[0, 1, 2]]
    assert pairwise_agreement([[same, same]]) == 1.0
    assert pairwise_agreement([[same, flipped]]) == 0.0
    assert pairwise_agreement([[same, same, flipped]]) == pytest.approx(1 / 3)
    assert np.isnan(pairwise_agreement([[same, tied]]))


def test_bad_config_fails_early():
    with pytest.raises(ValueError, match="n_evaluators"):
        SimulatedPanel(PanelConfig(n_evaluators=0))
    with pytest.raises(ValueError, match="noise must be"):
        SimulatedPanel(PanelConfig(noise="gauss"))
