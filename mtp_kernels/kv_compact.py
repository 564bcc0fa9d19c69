"""KV-cache compaction after a verify step, for every layer's K and V in one call.

Shapes: caches, a list of [B, H, S, D] tensors (all layers' K and V, same shape and device); lengths [B]
int64, each row's prefix length before this step's block; keep [B, K] int64, per row the indices into the
block of the entries to keep, strictly increasing, padded with -1 at the end. In place: entry
lengths[b] + keep[b, i] moves to slot lengths[b] + i, then lengths[b] += number kept.

Runs the compiled extension (`torch.ops.mtp_kernels.kv_compact`: CPU parallel over rows and heads, one CUDA
launch for all layers) when it is built, else the torch reference.
"""

from __future__ import annotations

import torch

from mtp_kernels import backend, reference


def kv_compact(caches, lengths, keep):
    if backend.has_extension() and backend.mode() != "reference":
        torch.ops.mtp_kernels.kv_compact(list(caches), lengths, keep)
    else:
        reference.kv_compact(caches, lengths, keep)
