"""Draft sampling and acceptance: the LM-head product fused with the choice of token.

- `SamplingParams`: temperature (0 = greedy), top_k, top_p, validated once.
- `choose_tokens(hidden [N, d], weight [V, d], params, noise [N, V] | None) -> [N] int64`: argmax of the
  logits (ties to the lowest index, as torch), or a sample by the exponential race
  argmax_i(logit_i / T - log E_i) with E ~ Exp(1) passed in. Logits are rounded to the hidden dtype before
  the choice, as `F.linear` in that dtype would produce them, so greedy picks equal stock greedy's.
- `draft_chain(mlp, embed_weight [V, d], lm_weight [V, d], first_tokens [B], latents [B, k, d], params,
  noise [B, k, V] | None) -> drafts [B, k]`: y_j = choose(lm_head(mlp([embed(y_{j-1}); z_j]))).
- `accept_greedy(drafts [B, k], targets [B, k+1]) -> (accepted [B], next_token [B])`.
- `accept_sampling(logits [B, k+1, V], drafts [B, k], params, uniform [B, k], noise [B, k+1, V])
  -> (accepted [B], next_token [B])`. A draft of -1 means "no draft".

Kernel (greedy and temperature sampling): the vocabulary is split across programs; each computes its
logit tiles (h @ W_tile^T, fp32 accumulation) for a block of rows and keeps the best (key, index) per
row, so the [N, V] logits never reach global memory. A torch argmax over the per-split winners finishes
(first maximum wins, which keeps lowest-index ties). Top-k / top-p need each row's threshold over the
whole vocabulary: they run through the torch reference on row chunks of bounded size instead.
Acceptance works on [B, k] tensors (plus the verifier's [B, k+1, V] logits when sampling): plain,
sync-free torch ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp_kernels import backend, reference
from mtp_kernels.checks import FLOAT_DTYPES, check_tensor

# Rows per chunk of the top-k / top-p path, so that chunk x V logits stay within about 64 MB of fp32.
_FILTER_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        return self.top_k is not None or (self.top_p is not None and self.top_p < 1.0)


if backend.HAS_TRITON:
    import triton
    import triton.language as tl

    @backend.triton_kernel
    def _lm_head_choice_kernel(
        hidden_ptr, weight_ptr, noise_ptr, best_key_ptr, best_index_ptr,
        N, V, D, temperature, tiles_per_split,
        stride_hn, stride_wv, stride_nn, stride_bn,
        SAMPLE: tl.constexpr, ROUND_TO: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        row_ok = rows < N
        best_key = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        best_index = tl.full([BLOCK_N], 2147483647, dtype=tl.int32)
        for tile in range(split * tiles_per_split, (split + 1) * tiles_per_split):
            vocab = tile * BLOCK_V + tl.arange(0, BLOCK_V)
            vocab_ok = vocab < V
            logits = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                h = tl.load(hidden_ptr + rows[:, None] * stride_hn + dims[None, :],
                            mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)
                w = tl.load(weight_ptr + vocab[None, :] * stride_wv + dims[:, None],
                            mask=vocab_ok[None, :] & (dims < D)[:, None], other=0.0)
                if UPCAST:
                    logits += tl.dot(h.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                else:
                    logits += tl.dot(h, w)
            # Round as F.linear in the model's dtype would, so near-ties break as in stock greedy.
            keys = logits.to(ROUND_TO).to(tl.float32)
            if SAMPLE:
                noise = tl.load(noise_ptr + rows[:, None] * stride_nn + vocab[None, :],
                                mask=row_ok[:, None] & vocab_ok[None, :], other=1.0)
                keys = keys / temperature - tl.log(noise)  # the reference's exact operation order
            keys = tl.where(vocab_ok[None, :], keys, float("-inf"))
            tile_key = tl.max(keys, axis=1)
            # Lowest index among the tile's maxima; a later tile wins only if strictly better.
            tile_index = tl.min(tl.where(keys == tile_key[:, None], vocab[None, :], 2147483647), axis=1)
            better = tile_key > best_key
            best_index = tl.where(better, tile_index, best_index)
            best_key = tl.where(better, tile_key, best_key)
        tl.store(best_key_ptr + rows * stride_bn + split, best_key, mask=row_ok)
        tl.store(best_index_ptr + rows * stride_bn + split, best_index, mask=row_ok)

    _ROUND_TO = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                 torch.float64: tl.float32}


def _block_sizes(N: int, V: int, D: int, on_cuda: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_D, vocab splits) from a small table."""
    if not on_cuda:  # interpreter: few programs, big tiles
        return max(16, min(64, triton.next_power_of_2(N))), 256, max(16, min(128, triton.next_power_of_2(D))), 1
    block_n = 16 if N <= 16 else 64 if N <= 64 else 128
    block_v = 128 if block_n < 128 else 64
    tiles = triton.cdiv(V, block_v)
    # Enough programs to fill the GPU: about 256 per row block for a single row, fewer as rows grow.
    splits = max(1, min(tiles, 256 // triton.cdiv(N, block_n)))
    return block_n, block_v, 64, splits


def _fused_choice(hidden, weight, temperature, noise):
    N, D = hidden.shape
    V = weight.shape[0]
    block_n, block_v, block_d, splits = _block_sizes(N, V, D, hidden.is_cuda)
    tiles_per_split = triton.cdiv(triton.cdiv(V, block_v), splits)
    splits = triton.cdiv(triton.cdiv(V, block_v), tiles_per_split)
    best_key = torch.empty(N, splits, device=hidden.device, dtype=torch.float32)
    best_index = torch.empty(N, splits, device=hidden.device, dtype=torch.int32)
    sample = noise is not None
    _lm_head_choice_kernel[(triton.cdiv(N, block_n), splits)](
        hidden, weight, noise if sample else hidden, best_key, best_index,
        N, V, D, float(temperature) if sample else 1.0, tiles_per_split,
        hidden.stride(0), weight.stride(0), noise.stride(0) if sample else 0, best_key.stride(0),
        SAMPLE=sample, ROUND_TO=_ROUND_TO[hidden.dtype],
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        UPCAST=(not hidden.is_cuda) or hidden.dtype in (torch.float32, torch.float64),
    )
    winner = best_key.argmax(dim=1, keepdim=True)  # first maximum: the lowest split on ties
    return best_index.gather(1, winner).squeeze(1).long()


def _check_choice_inputs(hidden, weight, params, noise):
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; its dim 1 must be hidden's {hidden.shape[1]}")
    if params.greedy:
        return
    if noise is None:
        raise ValueError("noise (Exp(1) samples [N, V]) is required when sampling (temperature > 0)")
    check_tensor("noise", noise, ndim=2, device=hidden.device)
    if tuple(noise.shape) != (hidden.shape[0], weight.shape[0]):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; it must be ({hidden.shape[0]}, {weight.shape[0]})")


def choose_tokens(hidden, weight, params: SamplingParams = SamplingParams(), noise=None):
    _check_choice_inputs(hidden, weight, params, noise)
    if params.filtered:
        rows_per_chunk = max(1, _FILTER_CHUNK_ELEMENTS // weight.shape[0])
        return torch.cat([
            reference.choose_tokens(hidden[i : i + rows_per_chunk], weight, params.temperature, params.top_k,
                                    params.top_p, noise[i : i + rows_per_chunk])
            for i in range(0, hidden.shape[0], rows_per_chunk)
        ])
    if hidden.shape[0] and backend.use_triton(hidden):
        noise = None if params.greedy else noise.float().contiguous()
        return _fused_choice(hidden.contiguous(), weight.contiguous(), params.temperature, noise)
    return reference.choose_tokens(hidden, weight, params.temperature, params.top_k, params.top_p, noise)


def draft_chain(mlp, embed_weight, lm_weight, first_tokens, latents, params=SamplingParams(), noise=None):
    """k sequential sampler steps for a whole batch, each seeded with the previous step's token."""
    if latents.ndim != 3 or first_tokens.shape != latents.shape[:1]:
        raise ValueError(f"latents must be [B, k, d] and first_tokens [B]; got {tuple(latents.shape)} and "
                         f"{tuple(first_tokens.shape)}")
    drafts = []
    previous = first_tokens
    for j in range(latents.shape[1]):
        features = torch.cat([embed_weight[previous].to(latents.dtype), latents[:, j]], dim=-1)
        previous = choose_tokens(mlp(features), lm_weight, params, None if noise is None else noise[:, j])
        drafts.append(previous)
    return torch.stack(drafts, dim=1)


def _check_drafts(drafts, k_plus_one, what):
    check_tensor("drafts", drafts, ndim=2, dtypes=(torch.int32, torch.int64))
    if drafts.shape[1] + 1 != k_plus_one:
        raise ValueError(f"drafts has shape {tuple(drafts.shape)}; {what} must have one more column")


def accept_greedy(drafts, targets):
    check_tensor("targets", targets, ndim=2, dtypes=(torch.int32, torch.int64), device=drafts.device)
    _check_drafts(drafts, targets.shape[1], "targets")
    if drafts.shape[0] != targets.shape[0]:
        raise ValueError(f"drafts has {drafts.shape[0]} rows but targets has {targets.shape[0]}")
    return reference.accept_greedy(drafts, targets)


def accept_sampling(logits, drafts, params: SamplingParams, uniform, noise):
    if params.greedy:
        raise ValueError("accept_sampling needs temperature > 0; use accept_greedy for greedy decoding")
    check_tensor("logits", logits, ndim=3, dtypes=FLOAT_DTYPES)
    _check_drafts(drafts, logits.shape[1], "logits")
    B, K1, V = logits.shape
    if drafts.shape[0] != B or tuple(uniform.shape) != (B, K1 - 1) or tuple(noise.shape) != (B, K1, V):
        raise ValueError(
            f"shapes disagree: logits {tuple(logits.shape)}, drafts {tuple(drafts.shape)} (want [{B}, {K1 - 1}]), "
            f"uniform {tuple(uniform.shape)} (want [{B}, {K1 - 1}]), noise {tuple(noise.shape)} (want [{B}, {K1}, {V}])"
        )
    return reference.accept_sampling(logits, drafts, uniform, noise, params.temperature, params.top_k, params.top_p)
