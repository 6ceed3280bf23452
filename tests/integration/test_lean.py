"""The lean backward of MLPs and norms computes what transformers' modules compute, keeping less (tiny model)."""

import copy

import pytest
import torch

from rlhf.models.lean import lean_backward
from rlhf.models.load import load_causal_lm


def saved_bytes(fn, weights=()) -> int:
    """Bytes of the tensors autograd keeps for the backward of fn(); tensors shaped as one of `weights` (the
    parameters, or their copies cast by autocast, which the plain and the lean modules both keep) not counted."""
    seen = {}
    shapes = {tuple(w.shape) for w in weights}

    def pack(t):
        if tuple(t.shape) not in shapes:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


@pytest.mark.parametrize("autocast", [False, True])
def test_lean_backward_gives_the_same_outputs_and_gradients_and_keeps_less(autocast):
    torch.manual_seed(0)
    plain, _ = load_causal_lm("tiny")
    lean = copy.deepcopy(plain)
    assert lean_backward(lean) == 2 + 2 * 2 + 1  # 2 MLPs, 2 norms per block, the final norm
    ids = torch.randint(5, 200, (3, 11))
    results = []
    for model in (plain, lean):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            logits, seen = saved_bytes(lambda m=model: m(input_ids=ids).logits, list(model.parameters()))
        kept = sum(seen.values())
        logits.float().square().mean().backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}, kept))
    (logits_a, grads_a, kept_a), (logits_b, grads_b, kept_b) = results
    torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=0)  # the forward is bit-identical
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        # float32: rounding only (the residual stream's gradients are summed in another order); bf16: what one
        # rounding of a bf16 product more or less moves
        tol = 1.5e-2 if autocast else 1e-5
        torch.testing.assert_close(grads_b[name], g, rtol=tol, atol=tol * g.abs().max().item(), msg=name)
    assert kept_b < 0.75 * kept_a


def test_lean_backward_leaves_frozen_and_lora_modules_alone():
    from rlhf.models.freeze import train_top_layers
    from rlhf.models.lora import wrap_lora

    policy, _ = load_causal_lm("tiny")
    train_top_layers(policy, 1)
    assert lean_backward(policy) == 1 + 2 + 1  # the top block's MLP and norms, the final norm
    assert "forward" not in policy.model.layers[0].mlp.__dict__
    with_lora = wrap_lora(load_causal_lm("tiny")[0], 4, 8, 0.0, "all-linear")
    assert lean_backward(with_lora) == 0  # LoRA-wrapped projections keep their own forward; norms are frozen


def test_grouped_kv_heads_handed_to_sdpa_as_they_are_give_the_same_logits_and_gradients(monkeypatch):
    """`native_gqa_attention`: on a CPU, SDPA with enable_gqa and a padding mask computes what repeating the key/value
    heads does, and keeps less for the backward."""
    from rlhf.runtime.distributed import GQA_FLAG, native_gqa_attention

    policy, _ = load_causal_lm("tiny")  # 4 query heads share 2 key/value heads
    ids = torch.randint(5, 200, (3, 11))
    mask = (torch.arange(11) >= torch.tensor([[3], [0], [6]])).long()  # left padding: a mask is given
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv(GQA_FLAG, flag)
        policy.zero_grad()
        logits, seen = saved_bytes(
            lambda: policy(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        )
        logits.square().mean().backward()
        params = {p.untyped_storage().data_ptr() for p in policy.parameters()}
        kept = sum(n for ptr, n in seen.items() if ptr not in params)
        results.append((logits, {n: p.grad.clone() for n, p in policy.named_parameters()}, kept))
    (repeated, grads_r, kept_r), (grouped, grads_g, kept_g) = results
    torch.testing.assert_close(grouped, repeated, rtol=0, atol=0)
    for name in grads_r:
        torch.testing.assert_close(grads_g[name], grads_r[name], rtol=1e-6, atol=1e-7, msg=name)
    assert kept_g < kept_r
    monkeypatch.delenv(GQA_FLAG)
    assert native_gqa_attention(torch.device("cpu")) == (torch.__version__ >= "2.5")
    assert not native_gqa_attention(torch.device("meta"))


def test_the_lean_mlp_casts_its_weights_once_a_pass_under_autocast():
    """Its backward multiplies by the copies the forward cast (saved), not by new casts of the float32 weights."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rlhf.models.lean import GatedMLP

    class Casts(TorchDispatchMode):
        def __init__(self, shapes):
            super().__init__()
            self.shapes, self.count = shapes, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_):
                self.count += tuple(out.shape) in self.shapes and out.dtype == torch.bfloat16
            return out

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen, requires_grad=True) for s in ((24, 16), (24, 16), (16, 24))]
    x = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = GatedMLP.apply(x, *weights)
    casts = Casts({tuple(w.shape) for w in weights})
    with casts:
        y.float().square().sum().backward()
    assert casts.count == 0
    assert all(w.grad is not None and w.grad.dtype == torch.float32 for w in weights)


def test_rmsnorms_backward_by_the_kernel_is_autograds_and_float32_norms_take_it(monkeypatch):
    from rlhf.models import lean

    lib = lean.norm_kernel()
    if lib is None:
        pytest.skip("the RMSNorm kernel cannot be built here")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 37, generator=gen, requires_grad=True)  # 37: vector tails
    weight = (torch.randn(37, generator=gen) * 0.1 + 1).requires_grad_()
    dy = torch.randn(2, 7, 37, generator=gen)
    rstd = torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + 1e-5)
    (weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))).backward(dy)
    dx, d_weight, _ = lean.rms_norm_backward_by_kernel(lib, x.detach(), rstd, weight.detach(), dy)
    torch.testing.assert_close(dx, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_weight, weight.grad, rtol=1e-5, atol=1e-5)
    # a model's float32 norms take it (under bf16 autocast too: the residual stream stays float32)
    calls = []
    original = lean.rms_norm_backward_by_kernel
    monkeypatch.setattr(lean, "rms_norm_backward_by_kernel", lambda *a: calls.append(1) or original(*a))
    model, _ = load_causal_lm("tiny")
    assert lean_backward(model) == 2 + 2 * 2 + 1
    with torch.autocast("cpu", torch.bfloat16):
        model(input_ids=torch.randint(5, 200, (2, 9))).logits.float().square().mean().backward()
    assert len(calls) == 2 * 2 + 1


def test_a_loaded_model_keeps_its_lean_norms_through_train_and_eval(tmp_path):
    """transformers with the `kernels` package would swap hub kernels in at every train() and eval(), taking away
    the norms' lean forward (and reaching for a download); models are loaded without them."""
    from rlhf.models.lean import rms_norm_forward
    from rlhf.models.reward import load_reward_model

    model, tokenizer = load_causal_lm("tiny")
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    for loaded, _ in (load_causal_lm(str(tmp_path / "lm")), load_reward_model(str(tmp_path / "lm"))):
        assert lean_backward(loaded) > 0
        loaded.train()
        loaded.eval()
        norms = [m for m in loaded.modules() if type(m).__name__.endswith("RMSNorm")]
        assert norms and all(m.forward.__func__ is rms_norm_forward for m in norms)
