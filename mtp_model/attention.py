"""The per-row-length KV cache and the attention function that MTP forwards run through.

- `MTPCache(num_layers, batch_size, max_slots, device)`: a transformers `Cache` whose layers are
  [B, Hkv, S, D] buffers of S = `max_slots` entries per row. `lengths` [B] holds each row's number of kept
  entries and `starts` [B] where its real tokens begin (left padding stays in the cache prefix and is
  never attended to). `reserve(n)` makes room for n entries per row before a forward, growing every
  buffer to at least twice its size when it is short: the cache follows what a call keeps (amortised
  copies), not what its max_new_tokens would allow. `update()` writes a forward's T new entries of row b
  at [lengths[b], lengths[b] + T) (`write` takes them already laid out [B, T, Hkv, D], with `write_index`
  computed once per forward) and returns the whole buffers; `keep(keep_index)` then compacts the entries
  worth keeping (all layers in one `kv_compact` call) and advances the lengths.
  A non-finite key or value is written as 0: only mask tokens' can be non-finite in a model whose own
  states are finite (an adapter that overflows), and a regular query that may not see such an entry would
  still multiply it by its zero weight (0 x NaN = NaN), so the verified tokens would change; mask entries
  are never kept, so this changes drafts only.
- `StepAttention`: what one MTP forward tells every attention layer (lengths, starts, the T x T block
  mask). It travels as the `mtp_step` keyword argument, which transformers hands to the attention
  function.
- `use_mtp_attention(model)` registers, for the model's attention implementation X, the implementation
  "mtp+X": `tree_attention` when `mtp_step` is given, `training_attention.grid_attention` when `mtp_grid`
  (a training batch's `TrainingGrid`) is, and X itself otherwise, so ordinary forwards of a patched model
  are exactly the stock ones.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import mtp_kernels
from mtp_model.training_attention import grid_attention

PREFIX = "mtp+"


@dataclass
class StepAttention:
    lengths: torch.Tensor  # [B] int64, kept entries per row before this forward
    starts: torch.Tensor  # [B] int64, first real (non-padding) slot per row
    block_mask: torch.Tensor  # [T, T] bool, True = may attend


class MTPCacheLayer(CacheLayerMixin):
    """One decoder layer's preallocated K/V; the lengths live in the owning `MTPCache`."""

    is_sliding = False
    is_compileable = True  # its writes trace under torch.compile(fullgraph=True): `compile_step` compiles through them

    def __init__(self, owner: MTPCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states):
        batch, heads, _, head_dim = key_states.shape
        shape = (batch, heads, self.owner.max_slots, head_dim)
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros(shape)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def grow(self, slots: int) -> None:
        """Moves the entries into buffers of `slots` entries per row."""
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], slots, old.shape[3])
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def update(self, key_states, value_states, *args, **kwargs):
        index = self.owner.write_index(key_states.shape[2])
        return self.write(key_states.transpose(1, 2), value_states.transpose(1, 2), index)

    def write(self, keys: torch.Tensor, values: torch.Tensor, index) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores a forward's keys and values [B, T, Hkv, D] at `index` (`MTPCache.write_index(T)`); returns
        the whole [B, Hkv, S, D] buffers."""
        if not self.is_initialized:
            self.lazy_initialization(keys.transpose(1, 2), values.transpose(1, 2))
        # The decoding loop reserves room for every block; checking here would sync every layer.
        rows, slots = index
        # Advanced indices around a slice put their dims first: the target view is [B, T, H, D].
        self.keys[rows, :, slots] = keys.nan_to_num(0.0, 0.0, 0.0)
        self.values[rows, :, slots] = values.nan_to_num(0.0, 0.0, 0.0)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return int(self.owner.lengths.max()) if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.owner.max_slots


class MTPCache(Cache):
    """A KV cache with one length per row, with room for `max_slots` entries per row (`reserve` grows it)."""

    def __init__(self, num_layers: int, batch_size: int, max_slots: int, device: torch.device):
        self.max_slots = max_slots
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.starts = torch.zeros(batch_size, dtype=torch.long, device=device)
        super().__init__(layers=[MTPCacheLayer(self) for _ in range(num_layers)])

    def reserve(self, slots: int) -> None:
        """Room for `slots` entries per row: when short, every layer grows to max(slots, 2 x max_slots)."""
        if slots <= self.max_slots:
            return
        self.max_slots = max(slots, 2 * self.max_slots)
        for layer in self.layers:
            if layer.is_initialized:
                layer.grow(self.max_slots)

    def write_index(self, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a forward's `new_tokens` entries go: (rows [B, 1], slots [B, T]) after each row's kept ones."""
        rows = torch.arange(self.lengths.shape[0], device=self.lengths.device)[:, None]
        return rows, self.lengths[:, None] + torch.arange(new_tokens, device=self.lengths.device)

    def step_attention(self, block_mask: torch.Tensor) -> StepAttention:
        return StepAttention(self.lengths, self.starts, block_mask)

    def keep(self, keep_index: torch.Tensor, block_size: int) -> None:
        """Keeps entries `keep_index` [B, K] (block indices, -1 padded) of the last forward's block."""
        buffers = [tensor for layer in self.layers for tensor in (layer.keys, layer.values)]
        mtp_kernels.kv_compact(buffers, self.lengths, keep_index, block_size)


def _mtp_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, mtp_step=None,
                   mtp_grid=None, **kwargs):
    if mtp_grid is not None:  # a training forward over the MTP layout
        out = grid_attention(query, key, value, mtp_grid, scaling, dropout)
        return out.transpose(1, 2), None
    if mtp_step is None:
        base = module.config._attn_implementation.removeprefix(PREFIX)
        return _base_attention(base, module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    out = mtp_kernels.tree_attention(query, key, value, mtp_step.lengths, mtp_step.block_mask, scaling, mtp_step.starts)
    return out.transpose(1, 2), None  # transformers expects [B, T, H, D]


def _base_attention(name: str, module):
    if name == "eager":  # not in the registry: each modeling file defines its own
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def use_mtp_attention(model) -> str:
    """Switches `model` to "mtp+<its implementation>" and returns the previous implementation."""
    base = model.config._attn_implementation or "eager"
    name = PREFIX + base
    AttentionInterface.register(name, _mtp_attention)
    # Ordinary forwards build their masks exactly as the base implementation does; MTP forwards pass a
    # ready 4D mask, which transformers hands through untouched.
    mask_function = ALL_MASK_ATTENTION_FUNCTIONS.get(base, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    AttentionMaskInterface.register(name, mask_function)
    model.set_attn_implementation(name)
    return base
