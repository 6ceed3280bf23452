"""The AVX2 kernel for float32 decoding products computes F.linear, the decoder takes it where it applies, and a
machine that cannot build it decodes as before (tiny models)."""

import functools

import pytest
import torch
import torch.nn.functional as F

from rlhf.models import thin
from rlhf.models.generation import TransformersDecoder
from rlhf.models.llama_decoder import LlamaDecoder
from rlhf.models.thin import ThinProduct
from rlhf.models.tiny import tiny_model, tiny_tokenizer


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """thin.library() decided again in this test (in a fresh cache folder), and again after it."""
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path))
    thin.library.cache_clear()
    yield
    thin.library.cache_clear()


def kernel():
    """The kernel built and loaded without the probe that `thin.load` runs (which would hide a wrong result)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the kernel needs an x86-64 CPU with AVX2")
    try:
        return thin.bind(thin.build())
    except FileNotFoundError as e:
        pytest.skip(f"no C compiler to build the kernel: {e}")


# every tail of a 4-row block; up to 16 rows (a decoding step) in pieces of 32 weight rows, more in 128-row chunks
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 8, 16, 17, 129, 300])
@pytest.mark.parametrize("k", [37, 70])  # no multiple of 8; a decoding step's pieces: 32 + 5, 32 + 32 + 6
def test_the_kernel_multiplies_as_f_linear(rows, k):
    lib = kernel()
    gen = torch.Generator().manual_seed(rows)
    # two weights stacked (as q, k, v are), 53 outputs: the last panel of 24 is padded
    weights = [torch.randn(40, k, generator=gen), torch.randn(13, k, generator=gen)]
    x = torch.randn(rows, k, generator=gen)
    got = ThinProduct(weights, lib)(x)
    want = F.linear(x, torch.cat(weights))
    assert got.shape == (rows, 53)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and rows given as (B, n, K), the decoder's shape; a bf16 weight is multiplied in float32
    x3 = x[: rows - rows % 2].view(2, -1, k) if rows > 1 else x.view(1, 1, k)
    got3 = ThinProduct([w.bfloat16() for w in weights], lib)(x3)
    torch.testing.assert_close(got3, F.linear(x3, torch.cat(weights).bfloat16().float()), rtol=1e-5, atol=1e-5)


def test_float32_decoding_takes_the_kernel_where_it_applies_and_oneDNN_when_turned_off(monkeypatch, fresh_library):
    kernel()  # skips where it cannot run
    monkeypatch.setattr(thin, "applies", lambda: True)  # an AVX-512 CPU runs it too: checked here on any
    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    want = TransformersDecoder(model).prefill(ids, mask, positions)
    for setting, expected in (("1", ThinProduct), ("0", functools.partial)):
        monkeypatch.setenv("RLHF_THIN_LINEAR", setting)
        thin.library.cache_clear()
        lean = LlamaDecoder(model, 2, 6)
        assert all(isinstance(p, expected) for layer in lean.layers for p in (layer[1], layer[2], layer[4], layer[5]))
        assert isinstance(lean.head, expected)
        with torch.no_grad():
            torch.testing.assert_close(lean.prefill(ids, mask, positions), want, rtol=1e-5, atol=1e-5)
            lean.step(torch.tensor([3, 4]), positions[:, -1:] + 1)


def test_a_machine_that_cannot_build_the_kernel_decodes_with_oneDNN(monkeypatch, fresh_library):
    monkeypatch.setattr(thin, "applies", lambda: True)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(RuntimeWarning, match="could not be built"):  # said, not raised
        assert thin.library() is None
    tok = tiny_tokenizer()
    lean = LlamaDecoder(tiny_model(tok).eval(), 1, 4)
    assert isinstance(lean.head, functools.partial)
    with torch.no_grad():
        assert lean.prefill(
            torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long), torch.tensor([[0, 1]])
        ).shape == (
            1,
            len(tok),
        )


def test_a_decoding_step_in_one_kernel_call_computes_the_eager_blocks(monkeypatch, fresh_library):
    """`thin.ThinLayers`: every block of a step in one call computes the decoder's eager step (logits, the cache,
    the recorded bottom), over left-padded rows and grouped heads; RLHF_THIN_LAYERS=0 keeps the eager step."""
    kernel()  # skips where it cannot run
    monkeypatch.setattr(thin, "applies", lambda: True)
    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()  # 4 query heads on 2 key/value heads
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 13, 14, 15, 16]])
    mask = (ids > 0).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(3, 200, (3,), generator=gen) for _ in range(5)]
    results = []
    for setting in ("1", "0"):
        monkeypatch.setenv("RLHF_THIN_LAYERS", setting)
        lean = LlamaDecoder(model, 3, 10, record=1)
        assert (lean.thin_layers is not None) == (setting == "1")
        with torch.no_grad():
            logits = [lean.prefill(ids, mask, positions)]
            logits += [lean.step(t, positions[:, -1:] + 1 + i) for i, t in enumerate(tokens)]
        results.append((torch.stack(logits), lean.recorded, lean.keys_t, lean.values))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = TransformersDecoder(model)
    with torch.no_grad():
        want = [plain.prefill(ids, mask, positions)]
        want += [plain.step(t, positions[:, -1:] + 1 + i) for i, t in enumerate(tokens)]
    torch.testing.assert_close(results[0][0], torch.stack(want), rtol=1e-5, atol=1e-5)
