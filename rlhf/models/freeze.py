"""Training only the top layers of a transformer (trlx's `num_layers_unfrozen`): the backward pass stops at the
lowest trainable layer, so on small hardware a PPO update costs a fraction of a full one; and the frozen part,
which training never changes, can be shared with a frozen model that started from the same weights."""

from __future__ import annotations

import contextlib
import functools

import torch


def trunk_of(model) -> torch.nn.Module:
    """The transformer trunk of a causal LM or sequence classifier (`model.model` for Llama), or the trunk itself."""
    return getattr(model, model.base_model_prefix, model)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The stack of transformer blocks of a causal LM or sequence classifier (Llama/Mistral/Qwen `layers`, GPT `h`)."""
    base = trunk_of(model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(f"{type(model).__name__}: no stack of decoder layers found; train all layers instead")


def train_top_layers(model, n: int) -> int:
    """Freeze the input embeddings and all but the top `n` blocks; what follows the blocks (final norm, an LM head
    not tied to the embeddings, a score head) stays trainable. Returns the number of trainable parameters."""
    layers = decoder_layers(model)
    if not 1 <= n <= len(layers):
        raise ValueError(f"trainable_layers ({n}) must be between 1 and the model's {len(layers)} layers")
    frozen = {id(p) for layer in layers[: len(layers) - n] for p in layer.parameters()}
    frozen |= {id(p) for p in model.get_input_embeddings().parameters()}  # a tied LM head stays frozen with them
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def share_frozen_layers(frozen_model, trained_model) -> int:
    """Point `frozen_model`'s input embeddings and bottom blocks at `trained_model`'s own modules wherever those are
    frozen in both and hold exactly the same weights (PPO's reference is the SFT model the policy starts from; its
    reward model is where the value model starts; a value model started from the policy, or from a reward model
    whose bottom was not trained, has the policy's bottom). Training never changes them, so one copy in memory
    serves both, and outputs stay bit-identical. `frozen_model` may train its own top (a value model). A tied LM
    head follows the embeddings. Returns the parameters shared (0 when the embeddings differ or are trained: then
    nothing is touched)."""
    emb_t, emb_f = trained_model.get_input_embeddings(), frozen_model.get_input_embeddings()
    if not _frozen_and_equal(emb_t, emb_f):
        return 0
    head = frozen_model.get_output_embeddings()
    tied = head is not None and head.weight is emb_f.weight
    frozen_model.set_input_embeddings(emb_t)
    if tied:
        head.weight = emb_t.weight
    shared = sum(p.numel() for p in emb_t.parameters())
    layers_t, layers_f = decoder_layers(trained_model), decoder_layers(frozen_model)
    for i in range(min(len(layers_t), len(layers_f))):
        if not _frozen_and_equal(layers_t[i], layers_f[i]):
            break
        layers_f[i] = layers_t[i]
        shared += sum(p.numel() for p in layers_t[i].parameters())
    return shared


def _frozen_and_equal(trained: torch.nn.Module, other: torch.nn.Module) -> bool:
    if any(p.requires_grad for m in (trained, other) for p in m.parameters()):
        return False
    a, b = trained.state_dict(), other.state_dict()
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def store_frozen_blocks_in(frozen_model, dtype: torch.dtype, keep: torch.nn.Module) -> int:
    """Store the linear weights inside `frozen_model`'s blocks in `dtype` (bf16 for a frozen reference or reward model
    under bf16 autocast, which casts every linear layer's weight to bf16 before multiplying anyway: outputs are
    unchanged, while memory and the per-forward casts are saved). Norms and embeddings keep their precision; layers
    whose weights are also `keep`'s (the model being trained that it shares blocks with) are left alone. Returns the
    parameters stored in `dtype`."""
    kept = {id(p) for p in keep.parameters()}
    done = 0
    for m in decoder_layers(frozen_model).modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in kept:
            m.to(dtype)
            done += sum(p.numel() for p in m.parameters())
    return done


def cast_frozen_heads_once(models, dtype: torch.dtype) -> int:
    """Give each of `models` whose LM head is frozen (tied to frozen input embeddings, as `train_top_layers` leaves
    it) a copy of the head's weight in `dtype`, which its head multiplies by under `dtype` autocast. Autocast keeps
    its casts only of weights that train, so a frozen head was cast again in every forward: for the embedded model's
    49152 × 576 head 15–20 ms on a 2-core CPU, ~7 times a PPO step. The product is the same bit for bit (the cast is
    the one autocast made); outside that autocast the head runs as before. One copy per distinct weight (a reference
    sharing the policy's embeddings shares it). Returns the number of heads given one."""
    copies, done = {}, 0
    for model in models:
        head = model.get_output_embeddings() if model is not None else None
        if type(head) is not torch.nn.Linear or head.weight.requires_grad:
            continue
        if id(head.weight) not in copies:
            copies[id(head.weight)] = FrozenHead(head.weight.detach().to(dtype))
        head.forward = functools.partial(_head_forward, head, copies[id(head.weight)])  # shadows the class's
        done += 1
    return done


class FrozenHead:
    """A frozen head's weight W in the autocast dtype, and Wᵀ laid out contiguously, made at the first backward
    (`FrozenHeadProduct`)."""

    def __init__(self, weight: torch.Tensor):
        self.weight, self._transposed = weight, None

    def transposed(self) -> torch.Tensor:
        if self._transposed is None:
            self._transposed = self.weight.t().contiguous()
        return self._transposed


class FrozenHeadProduct(torch.autograd.Function):
    """x · Wᵀ for a frozen head W, whose backward multiplies the logits' gradient by a contiguous copy of Wᵀ (its
    transpose viewed back as W): oneDNN multiplies 256 × 49152 bf16 gradients by that layout at 807 GFLOP/s, by W
    itself at 660 (17.9 against 22 ms on a 2-core Zen 5, twice a PPO update's training; the copy is 57 MB)."""

    @staticmethod
    def forward(ctx, x, head: FrozenHead):
        ctx.head = head
        return torch.nn.functional.linear(x, head.weight)

    @staticmethod
    def backward(ctx, grad):
        return grad.matmul(ctx.head.transposed().t()), None


def _head_forward(head: torch.nn.Linear, frozen: FrozenHead, x: torch.Tensor) -> torch.Tensor:
    device, dtype = x.device.type, frozen.weight.dtype
    if not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) != dtype:
        return torch.nn.Linear.forward(head, x)
    with torch.autocast(device, enabled=False):
        x = x.to(dtype)
        if head.bias is None and x.requires_grad:
            return FrozenHeadProduct.apply(x, frozen)
        bias = None if head.bias is None else head.bias.to(dtype)
        return torch.nn.functional.linear(x, frozen.weight, bias)


def frozen_depth(model) -> int:
    """How many blocks at the bottom of `model` train nothing (0 when its input embeddings train)."""
    if any(p.requires_grad for p in model.get_input_embeddings().parameters()):
        return 0
    depth = 0
    for layer in decoder_layers(model):
        if any(p.requires_grad for p in layer.parameters()):
            break
        depth += 1
    return depth


@contextlib.contextmanager
def only_blocks(model, start: int, stop: int | None = None, final_norm: bool = True):
    """Within this block, `model`'s trunk (a causal LM, a sequence classifier or the bare trunk) runs only its
    blocks [start:stop], and skips its final norm unless `final_norm`. So a forward with stop = k and no final norm
    returns what leaves block k − 1, and a forward of the blocks from k given that as `inputs_embeds` finishes the
    original forward: frozen blocks whose output is already known are not run again."""
    base = trunk_of(model)
    layers, norm = base.layers, base.norm
    base.layers = layers[start:stop]
    if not final_norm:
        base.norm = torch.nn.Identity()
    try:
        yield
    finally:
        base.layers, base.norm = layers, norm


def bottom_output(model, depth: int, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The hidden states leaving `model`'s bottom `depth` blocks, (B, L, hidden)."""
    with only_blocks(model, 0, depth, final_norm=False):
        return trunk_of(model)(input_ids=input_ids, **kwargs).last_hidden_state


def blocks_output(model, start: int, stop: int, hidden: torch.Tensor, **kwargs) -> torch.Tensor:
    """The hidden states leaving `model`'s blocks [start:stop] given `hidden`, what enters block `start`
    (`bottom_output(model, start, …)` or another model's holding the same blocks), (B, L, hidden)."""
    with only_blocks(model, start, stop, final_norm=False):
        return trunk_of(model)(inputs_embeds=hidden, **kwargs).last_hidden_state


def forward_from(model, input_ids: torch.Tensor, bottom: torch.Tensor | None, depth: int, **kwargs):
    """`model`'s forward on `input_ids`; given `bottom` (`bottom_output` of its `depth` blocks for these rows), only
    the blocks above run."""
    if bottom is None:
        return model(input_ids=input_ids, **kwargs)
    with only_blocks(model, depth):
        return model(inputs_embeds=bottom, **kwargs)


def replays_exactly(model, depth: int, input_ids: torch.Tensor, **kwargs) -> bool:
    """Whether running `model` as its bottom `depth` blocks, then the rest from their output, gives bit-identical
    outputs on this batch. Decoders whose trunk embeds the tokens, loops over `layers` and ends in `norm` (Llama,
    Mistral, Qwen, SmolLM) do; an architecture that does more to `inputs_embeds` (adds positions, scales) does not,
    and then nothing is replayed."""
    base = trunk_of(model)
    if not isinstance(getattr(base, "layers", None), torch.nn.ModuleList) or not hasattr(base, "norm") or depth < 1:
        return False
    with torch.no_grad():
        full = model(input_ids=input_ids, **kwargs)
        replayed = forward_from(model, input_ids, bottom_output(model, depth, input_ids, **kwargs), depth, **kwargs)
    key = "logits" if "logits" in full else "last_hidden_state"
    return torch.equal(full[key], replayed[key])


def release_file_map(frozen_model, keep) -> None:
    """Copy into the process's own memory every parameter and buffer of `frozen_model` that is not also one of
    `keep`'s (a model it shares parts with). A model loaded from safetensors reads its weights through a map of the
    file, which stays mapped, and counted in resident memory once read, while any one of its tensors lives; after
    parts of a frozen model were shared or stored in bf16, this lets the map of the rest go."""
    kept = {id(t) for t in (*keep.parameters(), *keep.buffers())}
    with torch.no_grad():
        for t in (*frozen_model.parameters(), *frozen_model.buffers()):
            if id(t) not in kept:
                t.data = t.data.clone()
