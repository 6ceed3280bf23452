"""The C kernel for log-probabilities of chosen tokens (`rlhf/models/label_logprobs.c`) computes what
`rlhf.algos.ppo.logprobs_from_logits` defines, forward and backward, in float32 and bf16."""

import pytest
import torch

from rlhf.algos.ppo import logprobs_from_logits
from rlhf.models import logprobs
from rlhf.models.logprobs import KernelLabelLogprobs, label_logprobs


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """logprobs.kernel() decided again in this test (in a fresh cache folder), and again after it."""
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path))
    decide = logprobs.kernel  # (`built` puts a stand-in in its place)
    decide.cache_clear()
    yield
    decide.cache_clear()


@pytest.fixture
def built(monkeypatch, fresh_kernel):
    """The kernel built and loaded without the probe `kernel()` runs (which would hide a wrong result)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the kernel needs an x86-64 CPU with AVX2")
    try:
        lib = logprobs._bind(logprobs.kernels.build(logprobs.SOURCE, logprobs.flags()))
    except FileNotFoundError as e:
        pytest.skip(f"no C compiler to build the kernel: {e}")
    monkeypatch.setattr(logprobs, "kernel", lambda: lib)
    return lib


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_gives_torchs_logprobs_and_gradients(built, dtype):
    gen = torch.Generator().manual_seed(0)
    vocab = 1003  # not a multiple of any vector width: the loops' tails run
    logits = (torch.randn(3, 7, vocab, generator=gen) * 8).to(dtype)
    logits[0, 0, :500] = -1e4  # exponentials that underflow to 0
    labels = torch.randint(0, vocab, (3, 7), generator=gen)
    labels[0, 0], labels[0, 1], labels[1, 1] = 600, 0, vocab - 1
    labels[2, 2] = int(logits[2, 2].float().argmax())
    g = torch.randn(3, 7, generator=gen)

    want_z = logits.clone().requires_grad_()
    want = logprobs_from_logits(want_z, labels)
    want.backward(g)
    got_z = logits.clone().requires_grad_()
    got = label_logprobs(got_z, labels)
    assert got_z.grad is None and got.grad_fn.name().startswith(KernelLabelLogprobs.__name__)
    got.backward(g)

    assert got.dtype == torch.float32 and got.shape == (3, 7)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-5)
    assert got_z.grad.dtype == dtype
    # bf16 gradients: the same float32 value rounded once, so at most one bf16 step apart
    tol = {"rtol": 8e-3, "atol": 1e-6} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(got_z.grad.float(), want_z.grad.float(), **tol)
    assert (got_z.grad[0, 0, :500] == 0).all()
    # the chosen token's gradient is g (1 - p): positive where g is
    assert torch.equal(got_z.grad.float().gather(-1, labels[..., None])[..., 0].sign(), g.sign())


def test_a_label_outside_the_vocabulary_is_an_error(built):
    with pytest.raises(IndexError, match="outside the vocabulary of 5"):
        label_logprobs(torch.zeros(1, 2, 5), torch.tensor([[0, 5]]))


def test_the_probe_accepts_the_kernel_and_the_switch_turns_it_off(fresh_kernel, monkeypatch):
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the kernel needs an x86-64 CPU with AVX2")
    with torch.no_grad():  # as a scoring forward first asks for it
        assert logprobs.kernel() is not None
    monkeypatch.setenv("RLHF_LOGPROBS_KERNEL", "0")
    logprobs.kernel.cache_clear()
    assert logprobs.kernel() is None
    z = torch.randn(2, 3, 11, requires_grad=True)
    out = label_logprobs(z, torch.zeros(2, 3, dtype=torch.long))
    assert not out.grad_fn.name().startswith(KernelLabelLogprobs.__name__)  # torch's definition instead
