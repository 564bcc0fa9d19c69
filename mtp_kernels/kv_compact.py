"""KV-cache compaction after a verify step, for every layer's K and V in one call.

Shapes: caches, a list of [B, H, S, D] tensors (all layers' K and V: same shape, strides, dtype, device,
contiguous last dim); lengths [B] int64, each row's prefix length before this step's block; keep [B, K]
int64, per row the indices into the block of the entries to keep, strictly increasing, padded with -1 at
the end; block_size, the number of entries this step wrote at [lengths[b], lengths[b] + block_size).
In place: entry lengths[b] + keep[b, i] moves to slot lengths[b] + i, then lengths[b] += number kept.

Runs the compiled extension (`torch.ops.mtp_kernels.kv_compact`: CPU parallel over rows and heads, one
CUDA launch for all layers) when it is built, else `torch_ops.kv_compact`. Invalid input raises ValueError
before any cache is written, a cache listed twice (or expanded) included.
"""

from __future__ import annotations

import torch

from mtp_kernels import backend, torch_ops
from mtp_kernels.checks import check_tensor


def _check_inputs(caches, lengths, keep, block_size):
    if not caches:
        raise ValueError("kv_compact: caches is empty")
    first = caches[0]
    check_tensor("caches[0]", first, ndim=4)
    seen = {}  # data pointer -> index: a cache listed twice (layers sharing one KV tensor) would move twice
    for index, cache in enumerate(caches):
        check_tensor(f"caches[{index}]", cache, ndim=4, dtypes=(first.dtype,), device=first.device)
        if cache.shape != first.shape:
            raise ValueError(f"caches[{index}] has shape {tuple(cache.shape)} but caches[0] has {tuple(first.shape)}")
        if any(stride == 0 and size > 1 for size, stride in zip(cache.shape, cache.stride())):
            raise ValueError(f"caches[{index}] is expanded (a stride of 0): its entries share memory")
        if cache.data_ptr() in seen:
            raise ValueError(f"caches[{index}] is the memory of caches[{seen[cache.data_ptr()]}]: list each "
                             "cache once")
        seen[cache.data_ptr()] = index
    B = first.shape[0]
    check_tensor("lengths", lengths, ndim=1, dtypes=(torch.int64,), device=first.device)
    check_tensor("keep", keep, ndim=2, dtypes=(torch.int64,), device=first.device)
    if lengths.shape[0] != B or keep.shape[0] != B:
        raise ValueError(f"lengths {tuple(lengths.shape)} and keep {tuple(keep.shape)} must have {B} rows, as the caches")
    if keep.shape[1] > block_size:
        raise ValueError(f"keep has {keep.shape[1]} columns but the block has only {block_size} entries")


def _check_values(lengths, keep, block_size, slots):
    """The data-dependent checks of the torch path (the extension does them in C++/CUDA)."""
    if bool((lengths < 0).any()) or bool((lengths + block_size > slots).any()):
        raise ValueError(f"kv_compact: length + block_size exceeds the cache's {slots} slots")
    kept = keep >= 0
    if bool((keep >= block_size).any()):
        raise ValueError(f"kv_compact: a kept index is outside the block of {block_size} entries")
    padding_first = kept[:, 1:] & ~kept[:, :-1]
    increasing = (keep[:, 1:] > keep[:, :-1]) | ~kept[:, 1:]
    if bool(padding_first.any()) or not bool(increasing.all()):
        raise ValueError("kv_compact: keep rows must be strictly increasing with -1 padding at the end")


def kv_compact(caches, lengths, keep, block_size: int) -> None:
    caches = list(caches)
    _check_inputs(caches, lengths, keep, block_size)
    if backend.has_extension() and backend.mode() != "torch":
        torch.ops.mtp_kernels.kv_compact(caches, lengths, keep.contiguous(), block_size)
        return
    _check_values(lengths, keep, block_size, caches[0].shape[2])
    torch_ops.kv_compact(caches, lengths, keep)


if backend.has_extension():

    @torch.library.register_fake("mtp_kernels::kv_compact")
    def _kv_compact_fake(caches, lengths, keep, block_size):
        # In-place op: nothing to allocate, only lets torch.compile trace through it.
        return None
