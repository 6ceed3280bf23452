"""Decoder blocks that compute the real tokens only, not the padding.

A batch of sequences of different lengths is padded to the longest: a PPO step's 8 rollouts of prompts of 37–58
tokens plus 32-token responses are 16% padding, a batch of demonstrations often a third or more. Every product,
norm and element-wise op of every block computed those positions for nothing. Here, during a trunk's forward, the
blocks take the real tokens of all rows as one sequence, (1, N, hidden), and only attention, which must keep the
rows apart, sees them in the padded layout (B, T): queries, keys and values are scattered into it and the output is
gathered back (`padded_attention`). The trunk's output is put back into the padded layout, zeros at the padding,
so its callers see the same shapes as before, and the same values at the real tokens up to float rounding.

The plain version, which this replaces inside each block:
    hidden = block(hidden)                      # (B, T, hidden), padding included
Here:
    hidden = pack(hidden)                       # (1, N, hidden), the real tokens row after row
    hidden = block(hidden)                      # attention: unpack q, k, v to (B, H, T, d), pack the output
    hidden = unpack(hidden)                     # after the last block and the final norm

It is done with hooks on the trunk and its blocks (`skip_padding`), so the transformers model, its saved form and
every caller stay as they are. A forward packs when it is given a padding mask (2-D, with zeros), keeps no KV cache
(a cache is read later in the padded layout) and checkpoints no activations (a block run again in the backward would
miss the layout); generation and unpadded batches run as before.

Rows that begin alike share their first tokens (`shared_tokens`). A chat template puts the same system prompt before
every conversation (SmolLM2's default is 24 tokens of the benchmark's 44-token prompts; Llama 3 and Qwen add one
too), and a reward model's K responses to one prompt all start with it. A token whose row agrees with an earlier
row on every real token up to it, at the same positions, has the very same hidden state in every block (attention
is causal), so it is computed once: the packed sequence holds one copy, and unpacking into the padded layout (the
keys and values every row's attention reads, the trunk's output) copies it into each row. In the backward the
copies' gradients add up in the one token, as they would have added up in the weights. Whether the first block's
inputs agree is read from the values themselves (bit for bit, positions included), so replaying a frozen bottom's
output shares what the bottom shared.

A caller that reads only some positions of the trunk's output says which (`reading`): the response positions of a
policy's log-probs and a value model's values, the last token of a reward model's score. The last block then
computes its queries, output projection and MLP at those positions only; its keys and values, which every position
reads, at all of them. (In any earlier block every position is needed, as keys and values of the next.) The
benchmark's rollouts are 437 tokens of which 256 are read, and a reward model reads one a row. The other
positions of that block's output are left as its input with nothing added: defined, never read.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch

_now = threading.local()  # .layout: the padding layout of the trunk forward now running (None: run as they are)


@dataclass
class Layout:
    """Where the real tokens of a padded batch are: `index` (N,), the flat positions b·T + t of the tokens computed,
    row after row; with tokens shared between rows (`share`), `source` (B·T,): for every position, 1 + the place in
    `index` of the token computed for it, 0 at the padding."""

    rows: int
    length: int
    index: torch.Tensor  # (N,) long
    mask: torch.Tensor  # (B, 1, T, T) bool: attend to earlier real tokens; every position also to itself
    packed: dict = field(default_factory=dict)  # id(tensor) → its packed form, for tensors every block is given
    started: bool = False  # the first block has packed the hidden states
    source: torch.Tensor | None = None  # (B·T,) long, with shared tokens only
    real: torch.Tensor | None = None  # (B, T) bool
    reads: torch.Tensor | None = None  # (B, T) bool: the positions of the output that are read (`reading`)
    last: torch.nn.Module | None = None  # the trunk's last block in this forward
    keep: torch.Tensor | None = None  # (n,) long: the places in `index` of the tokens read, while `last` runs
    parts: frozenset = frozenset()  # ids of `last`'s parts that run on those tokens only (`_partial_parts`)

    def places(self, wanted: torch.Tensor) -> torch.Tensor:
        """The places in `index` (sorted, each once) of the tokens computed for the real positions `wanted` (B, T)
        bool, shared tokens included."""
        flat = (wanted & self.real).flatten()
        if self.source is not None:
            return torch.unique(self.source[flat] - 1)
        return (self.real.flatten().cumsum(0) - 1)[flat]

    def share(self, hidden: torch.Tensor, positions: torch.Tensor | None) -> None:
        """Compute once the tokens that rows share (`shared_tokens`), from the first block's input (B, T, hidden)
        and the positions (B or 1, T; None: the column)."""
        if self.rows < 2 or hidden.shape[0] != self.rows:
            return
        if positions is None:
            positions = torch.arange(self.length, device=hidden.device)
        positions = positions.expand(self.rows, self.length)
        index, source = shared_tokens(self.real, fingerprints(hidden, positions), same_vectors(hidden, positions))
        if len(index) < len(self.index):
            self.index, self.source = index, source

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Layout:
        real = attention_mask.bool()  # (B, T)
        b, t = real.shape
        causal = torch.ones(t, t, dtype=torch.bool, device=real.device).tril()
        # A padding position attends to itself only: its output is never read, but a row with nothing to attend to
        # would give NaN in SDPA, and NaN times the zero gradient it gets is still NaN.
        mask = (causal & real[:, None, :]) | torch.eye(t, dtype=torch.bool, device=real.device)
        return cls(b, t, real.flatten().nonzero().squeeze(1), mask[:, None], real=real)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B or 1, T, …) → (1, N, …): the real tokens, row after row."""
        x = x.expand(self.rows, self.length, *x.shape[2:])
        return x.reshape(self.rows * self.length, *x.shape[2:]).index_select(0, self.index).unsqueeze(0)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(1, N, …) → (B, T, …), zeros at the padding (and a shared token in every row that holds it)."""
        rest = x.shape[2:]
        if self.source is not None:
            out = torch.cat([x.new_zeros(1, *rest), x[0]]).index_select(0, self.source)
        else:
            out = x.new_zeros(self.rows * self.length, *rest).index_copy(0, self.index, x[0])
        return out.view(self.rows, self.length, *rest)

    def pack_once(self, x: torch.Tensor) -> torch.Tensor:
        """`pack` of a tensor that every block is given (the rotary cos and sin, the positions): packed once."""
        key = id(x)
        if key not in self.packed:
            self.packed[key] = (x, self.pack(x))  # holding x keeps its id from being reused
        return self.packed[key][1]


def shared_tokens(real: torch.Tensor, keys: torch.Tensor, same=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which real tokens of a batch are computed when rows share their first ones. A token stands for itself unless
    its row agrees with an earlier row on every real token up to and including it (`keys` (B, T) int64 equal; where
    keys only fingerprint the tokens, `same(i, j, cols_i, cols_j)` says how many of those leading tokens of rows i
    and j are truly equal); then it stands for that row's token. Each row shares with the earlier row it agrees with
    longest. `real` (B, T) bool.

    Returns (index (N,), source (B·T,)): the flat positions b·T + t of the tokens computed, row after row (with
    nothing shared, every real token's), and for every position 1 + the place in `index` of the token that stands
    for it, 0 at the padding."""
    b, t = real.shape
    counts = real.sum(1)  # (B,)
    width = int(counts.max()) if b else 0
    cols = torch.argsort((~real).to(torch.int8), dim=1, stable=True)[:, :width]  # each row's real columns first
    valid = torch.arange(width, device=real.device)[None] < counts[:, None]  # (B, width)
    k = keys.gather(1, cols)
    agree = (k[:, None] == k[None]) & valid[:, None] & valid[None]  # (B, B, width)
    common = agree.to(torch.int32).cumprod(-1).sum(-1).tril(-1)  # (B, B): leading tokens in common, earlier rows
    place = torch.empty(b, width, dtype=torch.long, device=real.device)  # the index in `index` of each real token
    index, taken = [], 0
    for i in range(b):
        n, shared = int(counts[i]), 0
        if i:
            j = int(common[i, :i].argmax())
            shared = int(common[i, j])
            if shared and same is not None:
                shared = same(i, j, cols[i, :shared], cols[j, :shared])
            if shared:
                place[i, :shared] = place[j, :shared]
        place[i, shared:n] = torch.arange(taken, taken + n - shared, device=real.device)
        index.append(i * t + cols[i, shared:n])
        taken += n - shared
    source = torch.zeros(b * t, dtype=torch.long, device=real.device)
    flat = (torch.arange(b, device=real.device)[:, None] * t + cols)[valid]
    source[flat] = place[valid] + 1
    return torch.cat(index), source


def token_keys(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`shared_tokens`'s keys for token ids at positions (B, T): equal exactly where both are."""
    return ids.long() * 2**32 + positions.long()


def fingerprints(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One int64 per position of x (B, T, hidden), equal wherever the vectors are equal bit for bit at the same
    position: their bits times fixed random weights, summed in integers (exact, so equal inputs never differ)."""
    bits = x.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
    gen = torch.Generator().manual_seed(0x5EED)
    weights = torch.randint(1, 2**31 - 1, (x.shape[-1],), generator=gen).to(x.device)
    out = torch.stack([(row.long() * weights).sum(-1) for row in bits])  # (B, T), a row at a time: little memory
    return out * 1_000_003 + positions.long()


def same_vectors(x: torch.Tensor, positions: torch.Tensor):
    """`shared_tokens`'s check for rows of x (B, T, hidden): how many leading tokens are equal bit for bit (NaN
    never is), at the same positions."""

    def same(i, j, cols_i, cols_j) -> int:
        equal = (x[i, cols_i] == x[j, cols_j]).all(-1) & (positions[i, cols_i] == positions[j, cols_j])
        return int(equal.to(torch.int32).cumprod(0).sum())

    return same


@contextlib.contextmanager
def reading(reads: torch.Tensor):
    """Within this block, a trunk forward that skips padding (B, T) reads only the positions `reads` (B, T) bool of
    its output: its last block computes the rest as keys and values only, and leaves their output as its input.
    A forward of other rows, or one that does not skip padding, computes everything."""
    before, _now.reads = getattr(_now, "reads", None), reads
    try:
        yield
    finally:
        _now.reads = before


def padded_attention(attention, module, query, key, value, layout: Layout, dtype, *args, **kwargs):
    """`attention` (an attention-interface function) of packed queries, keys and values, (1, H, N, d), computed in
    the padded layout with `layout.mask`; returns the packed output (1, N, H, d). They are cast to `dtype` (what
    the attention multiplies in, autocast's dtype) before they are moved: fewer bytes, the same values."""
    q, k, v = (layout.unpack(x.transpose(1, 2).to(dtype)).transpose(1, 2) for x in (query, key, value))
    out, weights = attention(module, q, k, v, layout.mask, *args, **kwargs)  # (B, T, H, d)
    return layout.pack(out), weights


def skip_padding(model) -> bool:
    """Make `model`'s trunk compute only the real tokens of padded batches (its attention must accept a `Layout`
    as its mask: `rlhf.models.attention.small_attention`). Declined for a sliding window or mixed layer types (the
    layout's mask is plain causal), and kept only if, on a probe batch with padding, the outputs at the real tokens
    equal the padded forward's to float rounding; returns whether it is kept. The hooks act only while the model
    keeps the attention they were installed with."""
    from rlhf.models.attention import ATTENTION  # (it imports this module)
    from rlhf.models.freeze import decoder_layers, trunk_of

    trunk = trunk_of(model)
    if getattr(trunk, "_rlhf_skip_padding", None):
        return True
    try:
        blocks = decoder_layers(model)
    except ValueError:
        return False
    if getattr(trunk.config, "_attn_implementation", None) != ATTENTION or not _all_full_attention(trunk, blocks):
        return False
    padded = _probe(trunk)
    handles = [
        trunk.register_forward_pre_hook(_trunk_starts, with_kwargs=True),
        trunk.register_forward_hook(_trunk_ends, always_call=True),
        *(block.register_forward_pre_hook(_block_starts, with_kwargs=True) for block in blocks),
    ]
    trunk._rlhf_skip_padding = ATTENTION  # the attention the hooks work with (`_trunk_starts` checks it)
    packed = _probe(trunk)
    if padded is None or packed is None or not torch.allclose(packed, padded, rtol=1e-4, atol=1e-4):
        for h in handles:
            h.remove()
        del trunk._rlhf_skip_padding
        return False
    # (the hooks hold no block: a block shared into another model, `freeze.share_frozen_layers`, must not keep the
    # one it replaced alive)
    parts = [part for block in blocks for part in _partial_parts(block)]
    partial = [
        h for part in parts for h in (part.register_forward_pre_hook(_narrow), part.register_forward_hook(_widen))
    ]
    trunk._rlhf_partial = bool(partial)
    if partial:
        read = torch.tensor([[0, 0, 0, 1, 0, 1], [1, 0, 1, 0, 0, 0]], dtype=torch.bool)  # some of the real tokens
        with reading(read):
            got = _probe(trunk, read)
        if got is None or not torch.allclose(got, packed[read[_PROBE_MASK.bool()]], rtol=1e-4, atol=1e-4):
            for h in partial:
                h.remove()
            trunk._rlhf_partial = False
    return True


def _partial_parts(block) -> list[torch.nn.Module]:
    """The parts of a block that work on each position alone and that the last block runs at the positions read
    only: the queries' and the output's projections, the MLP (a block without all three is run whole)."""
    attention = getattr(block, "self_attn", None)
    parts = [getattr(attention, "q_proj", None), getattr(attention, "o_proj", None), getattr(block, "mlp", None)]
    return parts if all(isinstance(p, torch.nn.Module) for p in parts) else []


def _narrow(part, args):
    """`part` of the last block of a forward that reads some positions only (`reading`): its input (1, N, …)
    narrowed to the n tokens read."""
    layout = getattr(_now, "layout", None)
    if layout is None or layout.keep is None or id(part) not in layout.parts:
        return None
    return (args[0].index_select(1, layout.keep), *args[1:])


def _widen(part, args, output):
    """… and its output (1, n, …) put back in place, zeros elsewhere."""
    layout = getattr(_now, "layout", None)
    if layout is None or layout.keep is None or id(part) not in layout.parts:
        return None
    out = output.new_zeros(output.shape[0], len(layout.index), *output.shape[2:])
    return out.index_copy(1, layout.keep, output)


def _all_full_attention(trunk, blocks) -> bool:
    """Every block alike and attending to all earlier tokens: the layout's mask is plain causal, so a sliding window
    (Mistral, Phi-3, Qwen2's upper layers, Gemma3) or a stack of mixed layer types would be lost; the probe, one
    block of 6 tokens, could not see either."""
    types = set(getattr(trunk.config, "layer_types", None) or ["full_attention"])
    windows = [getattr(trunk.config, "sliding_window", None)]  # Mistral, Qwen2 with use_sliding_window
    windows += [getattr(getattr(b, "self_attn", None), "sliding_window", None) for b in blocks]
    return types == {"full_attention"} and not any(windows) and len({type(b) for b in blocks}) == 1


def _flag(trunk, kwargs, name: str) -> bool:
    """A forward's own setting, else its config's (as transformers reads use_cache, output_hidden_states, …)."""
    value = kwargs.get(name)
    return bool(getattr(trunk.config, name, False) if value is None else value)


def _trunk_starts(trunk, args, kwargs) -> None:
    mask = kwargs.get("attention_mask")
    keeps = _flag(trunk, kwargs, "use_cache") or kwargs.get("cache") is not None
    keeps = keeps or kwargs.get("past_key_values") is not None
    outputs = _flag(trunk, kwargs, "output_hidden_states") or _flag(trunk, kwargs, "output_attentions")
    # the attention the hooks were installed for (switched since, another would be handed a Layout as its mask)
    small = getattr(trunk.config, "_attn_implementation", None) == getattr(trunk, "_rlhf_skip_padding", None)
    # activation checkpointing runs a block again in the backward, after this forward's layout is gone
    recomputes = trunk.training and any(getattr(m, "gradient_checkpointing", False) for m in (trunk, *trunk.layers))
    padded = isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all())
    _now.layout = Layout.of(mask) if padded and small and not (keeps or outputs or recomputes) else None
    reads = getattr(_now, "reads", None)
    if _now.layout is not None and reads is not None and getattr(trunk, "_rlhf_partial", False) and len(trunk.layers):
        if reads.shape == mask.shape:
            _now.layout.reads, _now.layout.last = reads.to(mask.device), trunk.layers[-1]


def _block_starts(block, args, kwargs):
    layout = getattr(_now, "layout", None)
    if layout is None:
        return None
    hidden = args[0] if args else kwargs.pop("hidden_states")
    if not layout.started:  # the first block: (B, T, hidden) → (1, N, hidden), tokens rows share once
        layout.share(hidden, kwargs.get("position_ids"))
        hidden, layout.started = layout.pack(hidden), True
    if block is layout.last and layout.reads is not None:
        keep = layout.places(layout.reads)
        layout.keep = keep if len(keep) < len(layout.index) else None  # nothing to leave out: run it whole
        layout.parts = frozenset(id(p) for p in _partial_parts(block))
    kwargs["attention_mask"] = layout
    if kwargs.get("position_embeddings") is not None:
        kwargs["position_embeddings"] = tuple(layout.pack_once(x) for x in kwargs["position_embeddings"])
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = layout.pack_once(kwargs["position_ids"])
    return (hidden, *args[1:]), kwargs


def _trunk_ends(trunk, args, output):
    layout, _now.layout = getattr(_now, "layout", None), None
    if layout is None or not layout.started or output is None:
        return None
    if isinstance(output, tuple):  # return_dict=False
        return (layout.unpack(output[0]), *output[1:])
    output.last_hidden_state = layout.unpack(output.last_hidden_state)
    return output


_PROBE_MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


@torch.no_grad()
def _probe(trunk, read: torch.Tensor | None = None) -> torch.Tensor | None:
    """The output of the trunk's first block at the real tokens of a left- and a right-padded row (None: the forward
    failed). One block: every block is alike, and reading all of them would page the whole of a memory-mapped
    checkpoint into memory at load (200 MB more peak memory in a PPO run of four 135M models). `read` (2, 6) bool:
    the output at those positions only."""
    from rlhf.models.freeze import only_blocks
    from rlhf.models.reward import position_ids

    gen = torch.Generator().manual_seed(0)
    weight = trunk.get_input_embeddings().weight
    ids = torch.randint(0, weight.shape[0], (2, 6), generator=gen).to(weight.device)
    mask = _PROBE_MASK.to(weight.device)
    ids[1, :2] = ids[0, 2:4]  # the rows begin alike: their first two tokens are computed once
    positions = position_ids(mask)
    try:
        with only_blocks(trunk, 0, 1):
            out = trunk(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        out = out.last_hidden_state
    except Exception:  # noqa: BLE001 — an architecture whose blocks cannot run packed keeps its own forward
        return None
    finally:
        _now.layout = None
    return out[mask.bool() if read is None else read.to(out.device)]
