"""Tree attention for a verify step: T new queries over each row's cached prefix plus the new block.

Shapes: q [B, Hq, T, D]; k, v [B, Hkv, S, D] caches, row b holding its prefix in [0, lengths[b])
and this step's T new entries in [lengths[b], lengths[b] + T); block_mask [T, T] bool (True = may attend),
shared by all rows; lengths, starts [B] int: slots before starts[b] (left padding) are never attended to,
whether in the prefix or in the block. Returns [B, Hq, T, D] in q's dtype. Hq must be a multiple of
Hkv (grouped-query attention, K/V never repeated).

(Triton kernel: to be added; until then every device uses the torch reference.)
"""

from __future__ import annotations

import torch

from mtp_kernels import reference
from mtp_kernels.checks import FLOAT_DTYPES, check_same_dtype, check_tensor

INDEX_DTYPES = (torch.int32, torch.int64)


def _check_inputs(q, k, v, lengths, block_mask, starts):
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    device = q.device
    check_tensor("k", k, ndim=4, device=device)
    check_tensor("v", v, ndim=4, device=device)
    check_same_dtype("q", q, k=k, v=v)
    B, Hq, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k has shape {tuple(k.shape)}; batch and head dim must match q {tuple(q.shape)}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"q has {Hq} heads, not a multiple of k's {k.shape[1]} KV heads")
    check_tensor("lengths", lengths, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if lengths.shape[0] != B:
        raise ValueError(f"lengths has {lengths.shape[0]} entries for a batch of {B}")
    check_tensor("block_mask", block_mask, ndim=2, dtypes=(torch.bool,), device=device)
    if tuple(block_mask.shape) != (T, T):
        raise ValueError(f"block_mask has shape {tuple(block_mask.shape)}; it must be ({T}, {T}) for {T} queries")
    if starts is not None:
        check_tensor("starts", starts, ndim=1, dtypes=INDEX_DTYPES, device=device)
        if starts.shape[0] != B:
            raise ValueError(f"starts has {starts.shape[0]} entries for a batch of {B}")
    if B and int(lengths.max()) + T > k.shape[2]:
        raise ValueError(f"lengths + T = {int(lengths.max()) + T} exceeds the cache's {k.shape[2]} slots")


def tree_attention(q, k, v, lengths, block_mask, scale=None, starts=None):
    _check_inputs(q, k, v, lengths, block_mask, starts)
    return reference.tree_attention(q, k, v, lengths, block_mask, scale, starts)
