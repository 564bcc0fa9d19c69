"""Draft sampling and acceptance: the LM-head product fused with the choice of token.

- `SamplingParams`: temperature (0 = greedy), top_k, top_p, validated once.
- `choose_tokens(hidden [N, d], weight [V, d], params, noise [N, V] | None) -> [N] int64`: argmax of the
  logits (ties to the lowest index, as torch), or a sample by the exponential race
  argmax_i(logit_i / T - log E_i) with E ~ Exp(1) passed in. Logits are rounded to the hidden dtype before
  the choice, as `F.linear` in that dtype would produce them, so greedy picks equal stock greedy's.
- `draft_chain(sampler: SamplerWeights, embed_weight [V, d], lm_weight [V, d], first_tokens [B],
  latents [B, k, d], params, noise [B, k, V] | None, draft_tokens [V] | None) -> drafts [B, k]`:
  y_j = choose(lm_head(sampler([embed(y_{j-1}); z_j]))) for the sampler head's tensors
  (`SamplerWeights`, from `mtp_model.modules.SamplerHead.weights()`). The input layer's latent half runs
  once for all k steps and its token half is a row of the table E W_e^T [V, h] (kept per sampler while
  its weights are unchanged, up to TOKEN_TABLE_MAX_BYTES): a step is the body and the LM head only.
- `head_logits(hidden [..., d], weight [V, d]) -> [..., V]` fp32: the logits sampling verification
  accepts on.
- `accept_greedy(drafts [B, k], targets [B, k+1]) -> (accepted [B], next_token [B])`.
- `accept_sampling(logits [B, k+1, V], drafts [B, k], params, uniform [B, k], noise [B, k+1, V])
  -> (accepted [B], next_token [B])`. A draft of -1 means "no draft".

Each is a torch custom op (`torch.ops.mtp_kernels.<name>`, with a fake implementation for torch.compile)
behind a public function that validates its inputs once. Inside the ops, CPU tensors in fp32 (and bf16 where
oneDNN runs it natively: `cpu_linear.packing_applies`) get their LM-head products from oneDNN on the packed
head (`cpu_linear`: decoding's few rows against a large head run several times faster than through
F.linear; equal to it up to fp32 summation order); the draft chain
runs its k choices inside one op call. Benchmark: `benchmarks/bench_sampler.py`.

Kernels: the vocabulary is split across programs; each computes its logit tiles (h @ W_tile^T, fp32
accumulation) for a block of rows, so the [N, V] logits never reach global memory.
- Greedy and plain temperature sampling: each program keeps the best (key, index) per row; a torch argmax
  over the per-split winners finishes (first maximum wins, which keeps lowest-index ties).
- top_k <= MAX_FUSED_TOP_K (with or without top_p): each program keeps its 2 top_k best candidates per row
  in registers (a sorted list merged with each tile); torch then filters the few survivors exactly as
  `torch_ops` filters the whole vocabulary and runs the race on them.
- top_p alone (or a larger top_k) bounds nothing the kernel could keep: `torch_ops`, on row chunks
  of bounded size.
Acceptance works on [B, k] tensors (plus the verifier's [B, k+1, V] logits when sampling): plain,
sync-free torch ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mtp_kernels import backend, torch_ops
from mtp_kernels.checks import FLOAT_DTYPES, check_tensor
from mtp_kernels.cpu_linear import linear_on_packed, packing_applies
from mtp_kernels.derived import derived, trusted

@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:  # NaN fails >= too
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# Rows per chunk of the torch filtered path, so that chunk x V logits stay within about 64 MB of fp32.
_FILTER_CHUNK_ELEMENTS = 1 << 24
# The draft chain keeps the sampler's token table (one row per vocabulary entry) up to this size: 4 MB for
# the demo model, where it saves a product per draft; a 128k x 4096 one would not be worth its memory.
TOKEN_TABLE_MAX_BYTES = 64 << 20
# Largest top_k the fused kernel takes: its per-row candidate lists (2 top_k slots) live in registers, and
# past 64 they spill on an H100 (ptxas -v).
MAX_FUSED_TOP_K = 64
_EMPTY_CANDIDATE = -(2**63)  # smaller than every packed (key, token)

if backend.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _logit_tile(hidden_ptr, weight_ptr, rows, row_ok, vocab, vocab_ok, D, stride_hn, stride_wv,
                    ROUND_TO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr):
        """[BLOCK_N, BLOCK_V] logits h @ W^T, accumulated in fp32 and rounded as F.linear in ROUND_TO would."""
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
        # Rounded as the model's own LM head would return them, so near-ties break as in stock decoding.
        return logits.to(ROUND_TO).to(tl.float32)

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
        # As torch.argmax: a row of -inf picks its first index (the split's, and the first split wins)...
        best_index = tl.full([BLOCK_N], split * tiles_per_split * BLOCK_V, dtype=tl.int32)
        for tile in range(split * tiles_per_split, (split + 1) * tiles_per_split):
            vocab = tile * BLOCK_V + tl.arange(0, BLOCK_V)
            vocab_ok = vocab < V
            keys = _logit_tile(hidden_ptr, weight_ptr, rows, row_ok, vocab, vocab_ok, D, stride_hn, stride_wv,
                               ROUND_TO, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST)
            if SAMPLE:
                noise = tl.load(noise_ptr + rows[:, None] * stride_nn + vocab[None, :],
                                mask=row_ok[:, None] & vocab_ok[None, :], other=1.0)
                keys = keys / temperature - tl.log(noise)  # torch_ops' exact operation order
            # ... and a NaN counts as the largest value.
            keys = tl.where(vocab_ok[None, :], tl.where(keys != keys, float("inf"), keys), float("-inf"))
            tile_key = tl.max(keys, axis=1)
            # Lowest index among the tile's maxima; a later tile wins only if strictly better.
            tile_index = tl.min(tl.where(keys == tile_key[:, None], vocab[None, :], 2147483647), axis=1)
            better = tile_key > best_key
            best_index = tl.where(better, tile_index, best_index)
            best_key = tl.where(better, tile_key, best_key)
        tl.store(best_key_ptr + rows * stride_bn + split, best_key, mask=row_ok)
        tl.store(best_index_ptr + rows * stride_bn + split, best_index, mask=row_ok)

    @backend.triton_kernel
    def _lm_head_top_k_kernel(
        hidden_ptr, weight_ptr, candidates_ptr,
        N, V, D, temperature, tiles_per_split,
        stride_hn, stride_wv, stride_cn, stride_cs,
        ROUND_TO: tl.constexpr, EMPTY: tl.constexpr,
        BLOCK_N: tl.constexpr, CANDIDATES: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """The CANDIDATES largest keys logit / T of each row within this split's vocabulary, sorted descending.

        A candidate packs key and token into one int64: the key's fp32 bits mapped to an order-preserving
        int32 in the high half, the token in the low half. Tiles are CANDIDATES tokens wide: each is sorted
        ascending, and its elementwise maximum with the running list (sorted descending) holds exactly the
        CANDIDATES largest of both (a bitonic sequence), which one more sort puts back in order.
        """
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        row_ok = rows < N
        slots = tl.arange(0, CANDIDATES)
        best = tl.full([BLOCK_N, CANDIDATES], EMPTY, dtype=tl.int64)
        for tile in range(split * tiles_per_split, (split + 1) * tiles_per_split):
            vocab = tile * CANDIDATES + slots
            vocab_ok = vocab < V
            keys = _logit_tile(hidden_ptr, weight_ptr, rows, row_ok, vocab, vocab_ok, D, stride_hn, stride_wv,
                               ROUND_TO, BLOCK_N, CANDIDATES, BLOCK_D, UPCAST) / temperature
            bits = keys.to(tl.int32, bitcast=True)
            ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their magnitude order
            packed = (ordered.to(tl.int64) << 32) | vocab[None, :].to(tl.int64)
            packed = tl.where(vocab_ok[None, :], packed, EMPTY)
            # Once the lists fill up most tiles improve no row: skip their two sorts.
            improves = (tl.max(packed, axis=1) > tl.min(best, axis=1)) & row_ok
            if tl.max(improves.to(tl.int32), axis=0) > 0:
                best = tl.sort(tl.maximum(best, tl.sort(packed, dim=1)), dim=1, descending=True)
        tl.store(candidates_ptr + rows[:, None] * stride_cn + split * stride_cs + slots[None, :], best,
                 mask=row_ok[:, None])

    _ROUND_TO = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                 torch.float64: tl.float32}


def _vocab_splits(N: int, tiles: int, block_n: int, on_cuda: bool) -> tuple[int, int]:
    """(splits, tiles per split): on a GPU, about 256 programs for a single row block, fewer as rows grow."""
    splits = max(1, min(tiles, 256 // triton.cdiv(N, block_n))) if on_cuda else 1
    tiles_per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split


def _row_and_dim_blocks(N: int, D: int, on_cuda: bool, max_rows: int) -> tuple[int, int]:
    if not on_cuda:  # interpreter: few programs, big tiles
        return max(16, min(64, triton.next_power_of_2(N))), max(16, min(128, triton.next_power_of_2(D)))
    return min(max_rows, 16 if N <= 16 else 64 if N <= 64 else 128), 64


def _choice_blocks(N: int, D: int, on_cuda: bool, dtype: torch.dtype, sample: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_D) of the choice kernel: rows, vocabulary entries and hidden dims per tile.
    On CUDA the largest tiles that ptxas fits in registers at 4 warps for sm_90 (none spill in 16-bit
    types, a few words in fp32; tests/test_gpu_compile.py checks it): a [BLOCK_N, BLOCK_V] fp32 logit
    tile, and with sampling its noise tile beside it."""
    if not on_cuda:  # interpreter: few programs, big tiles
        block_n, block_d = _row_and_dim_blocks(N, D, on_cuda, max_rows=128)
        return block_n, 256, block_d
    if dtype in (torch.float32, torch.float64):
        return (16, 32, 64) if N <= 16 else (32, 32, 64)
    if N <= 16:
        return 16, 64 if sample else 128, 64
    return (32, 64, 64) if N <= 32 else (64, 32, 64)


def _launch_options(hidden) -> dict:
    return {"ROUND_TO": _ROUND_TO[hidden.dtype],
            # fp32/fp64, and every dtype in the interpreter (bf16 arithmetic on raw bits), multiply in fp32.
            "UPCAST": (not hidden.is_cuda) or hidden.dtype in (torch.float32, torch.float64)}


def _fused_choice(hidden, weight, temperature, noise):
    N, D = hidden.shape
    V = weight.shape[0]
    block_n, block_v, block_d = _choice_blocks(N, D, hidden.is_cuda, hidden.dtype, noise is not None)
    splits, tiles_per_split = _vocab_splits(N, triton.cdiv(V, block_v), block_n, hidden.is_cuda)
    best_key = torch.empty(N, splits, device=hidden.device, dtype=torch.float32)
    best_index = torch.empty(N, splits, device=hidden.device, dtype=torch.int32)
    sample = noise is not None
    _lm_head_choice_kernel[(triton.cdiv(N, block_n), splits)](
        hidden, weight, noise if sample else hidden, best_key, best_index,
        N, V, D, float(temperature) if sample else 1.0, tiles_per_split,
        hidden.stride(0), weight.stride(0), noise.stride(0) if sample else 0, best_key.stride(0),
        SAMPLE=sample, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, **_launch_options(hidden),
    )
    winner = best_key.argmax(dim=1, keepdim=True)  # first maximum: the lowest split on ties
    return best_index.gather(1, winner).squeeze(1).long()


def _unpack_candidates(packed, vocab_size):
    """int64 (key, token) candidates -> (keys fp32, -inf where empty; tokens, vocab_size where empty)."""
    empty = packed == _EMPTY_CANDIDATE
    ordered = packed >> 32
    bits = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(torch.int32)
    keys = bits.view(torch.float32).masked_fill(empty, float("-inf"))
    tokens = (packed & 0xFFFFFFFF).masked_fill(empty, vocab_size)
    return keys, tokens


def _top_k_candidates(hidden, weight, temperature, top_k):
    """[N, splits, C] packed (key, token) int64, each split's C = 2 top_k best (at least 16) sorted descending."""
    N, D = hidden.shape
    V = weight.shape[0]
    candidates = max(16, triton.next_power_of_2(2 * top_k))
    # 16 rows and 8 warps keep a 16 x 128 list and its sorts in registers (no spills at 254 per thread).
    block_n, block_d = _row_and_dim_blocks(N, D, hidden.is_cuda, max_rows=16)
    splits, tiles_per_split = _vocab_splits(N, triton.cdiv(V, candidates), block_n, hidden.is_cuda)
    packed = torch.empty(N, splits, candidates, device=hidden.device, dtype=torch.int64)
    _lm_head_top_k_kernel[(triton.cdiv(N, block_n), splits)](
        hidden, weight, packed, N, V, D, float(temperature), tiles_per_split,
        hidden.stride(0), weight.stride(0), packed.stride(0), packed.stride(1),
        EMPTY=_EMPTY_CANDIDATE, BLOCK_N=block_n, CANDIDATES=candidates, BLOCK_D=block_d, **_launch_options(hidden),
        num_warps=8,
    )
    return packed


def _fused_top_k_choice(hidden, weight, temperature, top_k, top_p, noise):
    """Samples from the top-k (then top-p) filtered distribution without writing [N, V] logits.

    The kernel leaves each (row, vocabulary split) its 2 top_k best candidates; torch finds the row's
    k-th key among them, applies top-p to the few survivors and runs the race on them in token order
    (so ties go to the lowest index, as over the whole vocabulary). `torch_ops` keeps every token tied
    with the k-th key; a split whose whole list ties with it may have had to leave some out, and those
    rows (ties of that size are all but impossible outside contrived weights) take the torch path.
    """
    packed = _top_k_candidates(hidden, weight, temperature, top_k)
    N, splits, candidates = packed.shape
    V = weight.shape[0]
    keys, tokens = _unpack_candidates(packed.view(N, -1), V)
    kth = keys.topk(top_k, dim=1).values[:, -1:]
    overflowed = (keys.view(N, splits, candidates)[:, :, -1] >= kth).any(dim=1)
    tokens, order = tokens.sort(dim=1)
    keys = keys.gather(1, order)
    keys = keys.masked_fill(keys < kth, float("-inf"))
    if top_p is not None:
        keys = torch_ops.top_p_filter(keys, top_p)
    race_keys = (keys - noise.gather(1, tokens.clamp(max=V - 1)).log()).masked_fill_(tokens == V, float("-inf"))
    chosen = tokens.gather(1, race_keys.argmax(dim=1, keepdim=True)).squeeze(1)
    if overflowed.any():  # the one host sync, on the sampling path only
        rows = overflowed.nonzero().squeeze(1)
        chosen[rows] = torch_ops.choose_tokens(hidden[rows], weight, temperature, top_k, top_p, noise[rows])
    return chosen


class SamplerWeights(NamedTuple):
    """The sampler head's tensors (`mtp_model.modules.SamplerHead.weights()`): input Linear [h, 2d] over
    [embed(previous token); latent], then SiLU -> LayerNorm -> Linear [h, h] -> SiLU -> LayerNorm; with
    `residual_scale` [1] the output is latent + residual_scale * that (h = d)."""

    input_weight: torch.Tensor
    input_bias: torch.Tensor | None
    norm1_weight: torch.Tensor | None
    norm1_bias: torch.Tensor | None
    hidden_weight: torch.Tensor
    hidden_bias: torch.Tensor | None
    norm2_weight: torch.Tensor | None
    norm2_bias: torch.Tensor | None
    residual_scale: torch.Tensor | None
    eps: float


def sampler_body(hidden, latent, weights: SamplerWeights):
    """Everything after the sampler's input layer: hidden [..., h] (the input layer's output) and latent
    [..., d] (the mask state it read) -> [..., d]."""
    hidden = F.layer_norm(F.silu(hidden), hidden.shape[-1:], weights.norm1_weight, weights.norm1_bias, weights.eps)
    hidden = F.silu(F.linear(hidden, weights.hidden_weight, weights.hidden_bias))
    hidden = F.layer_norm(hidden, hidden.shape[-1:], weights.norm2_weight, weights.norm2_bias, weights.eps)
    return hidden if weights.residual_scale is None else latent.to(hidden.dtype) + weights.residual_scale * hidden


# --- the ops' implementations: inputs checked by the public functions below -------------------------------


def _packs(hidden, weight) -> bool:
    """Whether this call's LM-head products run through oneDNN on the packed head (see cpu_linear): a head
    whose packed copy may be kept (`derived.trusted`)."""
    return hidden.dtype == weight.dtype and trusted(weight) and packing_applies(hidden.device, hidden.dtype)


def _head_logits(hidden, weight, packed: bool):
    if packed:  # rounded to the hidden dtype, as F.linear's (bf16: its bits)
        return linear_on_packed(hidden, weight).float()
    return torch_ops.lm_head_logits(hidden, weight)


def _choose(hidden, weight, temperature, top_k, top_p, noise, packed):
    """The token each row of hidden [N, d] picks from its logits against weight [V, d]; `packed`: `_packs`."""
    V = weight.shape[0]
    top_k = top_k if top_k is not None and top_k < V else None  # k >= V keeps all
    top_p = top_p if top_p is not None and top_p < 1.0 else None
    greedy = not temperature
    filtered = not greedy and (top_k is not None or top_p is not None)  # greedy ignores the filters
    # The kernels compute logits in fp32: fp64 takes the torch path, which keeps them in fp64.
    if hidden.shape[0] and backend.use_triton(hidden) and hidden.dtype != torch.float64:
        hidden, weight = hidden.contiguous(), weight.contiguous()
        noise = None if greedy else noise.float().contiguous()
        if not filtered:
            return _fused_choice(hidden, weight, temperature, noise)
        if top_k is not None and top_k <= MAX_FUSED_TOP_K:
            return _fused_top_k_choice(hidden, weight, temperature, top_k, top_p, noise)
    if not filtered or not hidden.shape[0]:
        return torch_ops.choose_from_logits(_head_logits(hidden, weight, packed), temperature, None, None, noise)
    # Top-p alone (no bound on its survivors), a large top_k, or the CPU: torch_ops, on row chunks so
    # that the filters' sorts stay within _FILTER_CHUNK_ELEMENTS.
    rows_per_chunk = max(1, _FILTER_CHUNK_ELEMENTS // V)
    return torch.cat([
        torch_ops.choose_from_logits(_head_logits(hidden[i : i + rows_per_chunk], weight, packed), temperature,
                                     top_k, top_p, noise[i : i + rows_per_chunk])
        for i in range(0, hidden.shape[0], rows_per_chunk)
    ])


def _draft_chain(first_tokens, latents, embed_weight, lm_weight, sampler, temperature, top_k, top_p, noise,
                 draft_tokens):
    """k sampler steps; sampler: the SamplerWeights' tensors in order, then its eps."""
    weights = SamplerWeights(*sampler)
    B, k, d = latents.shape
    # The input layer is linear in [embed(y); z] = W_e embed(y) + W_z z + b: the latent half for all k steps
    # is one product, and the token half a row of the table E W_e^T where that table is small.
    token_weight, latent_weight = weights.input_weight[:, :d], weights.input_weight[:, d:]
    latent_terms = F.linear(latents.to(latent_weight.dtype), latent_weight, weights.input_bias)  # [B, k, h]
    table = _token_table(embed_weight, weights.input_weight)
    packed = _packs(latent_terms, lm_weight)
    drafts = torch.empty(B, k, dtype=torch.long, device=latents.device)
    previous = first_tokens
    for j in range(k):
        if table is not None:
            token_terms = table[previous]
        else:
            token_terms = F.linear(embed_weight[previous].to(token_weight.dtype), token_weight)
        hidden = sampler_body(token_terms + latent_terms[:, j], latents[:, j], weights)
        previous = _choose(hidden, lm_weight, temperature, top_k, top_p, None if noise is None else noise[:, j],
                           packed)
        if draft_tokens is not None:
            previous = draft_tokens[previous]
        drafts[:, j] = previous
    return drafts


def _token_table(embed_weight, input_weight):
    """E W_e^T [V, h] (W_e: the embedding half of the sampler's input layer `input_weight` [h, 2d]) when it
    takes at most TOKEN_TABLE_MAX_BYTES and may be cached (`derived.trusted`: a sampler in training may
    not); else None."""
    V, (h, two_d) = embed_weight.shape[0], input_weight.shape
    if V * h * input_weight.element_size() > TOKEN_TABLE_MAX_BYTES or not trusted(embed_weight, input_weight):
        return None
    return derived("token-table", (embed_weight, input_weight),
                   lambda: F.linear(embed_weight.to(input_weight.dtype), input_weight[:, : two_d // 2]))


# --- the custom ops ------------------------------------------------------------------------------------

_SAMPLING = "float temperature, int? top_k, float? top_p"


@torch.library.custom_op("mtp_kernels::choose_tokens", mutates_args=(),
                         schema=f"(Tensor hidden, Tensor weight, {_SAMPLING}, Tensor? noise) -> Tensor")
def _choose_tokens_op(hidden, weight, temperature, top_k, top_p, noise):
    return _choose(hidden, weight, temperature, top_k, top_p, noise, _packs(hidden, weight))


@_choose_tokens_op.register_fake
def _(hidden, weight, temperature, top_k, top_p, noise):
    return hidden.new_empty(hidden.shape[0], dtype=torch.long)


@torch.library.custom_op(
    "mtp_kernels::draft_chain", mutates_args=(),
    schema=f"(Tensor first_tokens, Tensor latents, Tensor embed_weight, Tensor lm_weight, Tensor?[] sampler, "
           f"float eps, {_SAMPLING}, Tensor? noise, Tensor? draft_tokens) -> Tensor")
def _draft_chain_op(first_tokens, latents, embed_weight, lm_weight, sampler, eps, temperature, top_k, top_p, noise,
                    draft_tokens):
    return _draft_chain(first_tokens, latents, embed_weight, lm_weight, [*sampler, eps], temperature, top_k, top_p,
                        noise, draft_tokens)


@_draft_chain_op.register_fake
def _(first_tokens, latents, embed_weight, lm_weight, sampler, eps, temperature, top_k, top_p, noise, draft_tokens):
    return latents.new_empty(latents.shape[:2], dtype=torch.long)


@torch.library.custom_op("mtp_kernels::accept_greedy", mutates_args=(),
                         schema="(Tensor drafts, Tensor targets) -> (Tensor, Tensor)")
def _accept_greedy_op(drafts, targets):
    return torch_ops.accept_greedy(drafts, targets)


@_accept_greedy_op.register_fake
def _(drafts, targets):
    return targets.new_empty(targets.shape[0], dtype=torch.long), targets.new_empty(targets.shape[0])


@torch.library.custom_op(
    "mtp_kernels::accept_sampling", mutates_args=(),
    schema=f"(Tensor logits, Tensor drafts, Tensor uniform, Tensor noise, {_SAMPLING}) -> (Tensor, Tensor)")
def _accept_sampling_op(logits, drafts, uniform, noise, temperature, top_k, top_p):
    return torch_ops.accept_sampling(logits, drafts, uniform, noise, temperature, top_k, top_p)


@_accept_sampling_op.register_fake
def _(logits, drafts, uniform, noise, temperature, top_k, top_p):
    B = logits.shape[0]
    return logits.new_empty(B, dtype=torch.long), logits.new_empty(B, dtype=torch.long)


# --- the public functions: checks, then the op ----------------------------------------------------------


def _check_choice_inputs(hidden, weight, params, noise):
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; its dim 1 must be hidden's {hidden.shape[1]}")
    if params.greedy:
        return
    if noise is None:
        raise ValueError("noise (Exp(1) samples [N, V]) is required when sampling (temperature > 0)")
    check_tensor("noise", noise, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device)
    if tuple(noise.shape) != (hidden.shape[0], weight.shape[0]):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; it must be ({hidden.shape[0]}, {weight.shape[0]})")


def head_logits(hidden, weight):
    """fp32 (fp64 for fp64 inputs) logits [..., V] of `hidden` [..., d] as `torch_ops.lm_head_logits` gives
    them (on the CPU, through oneDNN on the packed head where `cpu_linear.packing_applies`: equal up to fp32
    summation order)."""
    return _head_logits(hidden, weight, _packs(hidden, weight) and not (
        torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)))


def choose_tokens(hidden, weight, params: SamplingParams = SamplingParams(), noise=None):
    _check_choice_inputs(hidden, weight, params, noise)
    noise = None if params.greedy else noise
    if backend.eager(hidden):
        return _choose(hidden, weight, *_sampling(params), noise, _packs(hidden, weight))
    return torch.ops.mtp_kernels.choose_tokens(hidden, weight, *_sampling(params), noise)


def _sampling(params: SamplingParams):
    top_k = None if params.top_k is None else int(params.top_k)
    return float(params.temperature), top_k, None if params.top_p is None else float(params.top_p)


def draft_chain(sampler: SamplerWeights, embed_weight, lm_weight, first_tokens, latents, params=SamplingParams(),
                noise=None, draft_tokens=None):
    """k sequential sampler steps for a whole batch, each seeded with the previous step's token. With
    `draft_tokens` [V_d], `lm_weight` holds those tokens' rows of the LM head ([V_d, d]) and a step's choice
    is among them (the noise is [B, k, V_d])."""
    if not isinstance(sampler, SamplerWeights):
        raise ValueError(f"sampler must be SamplerWeights (SamplerHead.weights()), got {type(sampler).__name__}")
    check_tensor("latents", latents, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("first_tokens", first_tokens, ndim=1, dtypes=(torch.int32, torch.int64), device=latents.device)
    if first_tokens.shape != latents.shape[:1]:
        raise ValueError(f"latents must be [B, k, d] and first_tokens [B]; got {tuple(latents.shape)} and "
                         f"{tuple(first_tokens.shape)}")
    B, k, d = latents.shape
    if not params.greedy and (noise is None or tuple(noise.shape) != (B, k, lm_weight.shape[0])):
        raise ValueError(f"sampling drafts needs Exp(1) noise of shape ({B}, {k}, {lm_weight.shape[0]}), got "
                         f"{None if noise is None else tuple(noise.shape)}")
    if draft_tokens is not None and tuple(draft_tokens.shape) != (lm_weight.shape[0],):
        raise ValueError(f"draft_tokens has shape {tuple(draft_tokens.shape)}; lm_weight has {lm_weight.shape[0]} "
                         f"rows, one per draft token")
    check_tensor("embed_weight", embed_weight, ndim=2, dtypes=FLOAT_DTYPES, device=latents.device)
    check_tensor("sampler.input_weight", sampler.input_weight, ndim=2, dtypes=FLOAT_DTYPES, device=latents.device)
    for name, tensor in sampler._asdict().items():  # one dtype and device for all the sampler's tensors
        if name != "eps" and (tensor is not None or name == "hidden_weight"):
            check_tensor(f"sampler.{name}", tensor, dtypes=(sampler.input_weight.dtype,), device=latents.device)
    if sampler.input_weight.shape[1] != 2 * d or embed_weight.shape[1] != d:
        raise ValueError(f"the sampler's input layer takes {sampler.input_weight.shape[1]} features; it needs "
                         f"[embedding; latent] = {embed_weight.shape[1]} + {d}")
    if draft_tokens is not None:
        check_tensor("draft_tokens", draft_tokens, dtypes=(torch.int32, torch.int64), device=latents.device)
    # Eager on the CPU only: reading the ids would sync a GPU, and a compiled graph cannot branch on them.
    checkable = not latents.is_cuda and B and not torch.compiler.is_compiling()
    if checkable and (int(first_tokens.min()) < 0 or int(first_tokens.max()) >= embed_weight.shape[0]):
        raise ValueError(f"first_tokens holds ids outside the vocabulary [0, {embed_weight.shape[0]})")
    if k == 0:
        return torch.empty(B, 0, dtype=torch.long, device=latents.device)
    _check_choice_inputs(latents[:, 0], lm_weight, params, None if noise is None else noise[:, 0])
    noise = None if params.greedy else noise
    if backend.eager(latents):
        return _draft_chain(first_tokens, latents, embed_weight, lm_weight, sampler, *_sampling(params), noise,
                            draft_tokens)
    return torch.ops.mtp_kernels.draft_chain(first_tokens, latents, embed_weight, lm_weight, list(sampler[:-1]),
                                             float(sampler.eps), *_sampling(params), noise, draft_tokens)


def _check_drafts(drafts, k_plus_one, what):
    check_tensor("drafts", drafts, ndim=2, dtypes=(torch.int32, torch.int64))
    if drafts.shape[1] + 1 != k_plus_one:
        raise ValueError(f"drafts has shape {tuple(drafts.shape)}; {what} must have one more column")


def accept_greedy(drafts, targets):
    check_tensor("targets", targets, ndim=2, dtypes=(torch.int32, torch.int64), device=drafts.device)
    _check_drafts(drafts, targets.shape[1], "targets")
    if drafts.shape[0] != targets.shape[0]:
        raise ValueError(f"drafts has {drafts.shape[0]} rows but targets has {targets.shape[0]}")
    if backend.eager(drafts):
        return torch_ops.accept_greedy(drafts, targets)
    return torch.ops.mtp_kernels.accept_greedy(drafts, targets)


def accept_sampling(logits, drafts, params: SamplingParams, uniform, noise):
    if params.greedy:
        raise ValueError("accept_sampling needs temperature > 0; use accept_greedy for greedy decoding")
    check_tensor("logits", logits, ndim=3, dtypes=FLOAT_DTYPES)
    _check_drafts(drafts, logits.shape[1], "logits")
    B, K1, V = logits.shape
    check_tensor("uniform", uniform, dtypes=FLOAT_DTYPES, device=logits.device)
    check_tensor("noise", noise, dtypes=FLOAT_DTYPES, device=logits.device)
    check_tensor("drafts", drafts, device=logits.device)
    if drafts.shape[0] != B or tuple(uniform.shape) != (B, K1 - 1) or tuple(noise.shape) != (B, K1, V):
        raise ValueError(
            f"shapes disagree: logits {tuple(logits.shape)}, drafts {tuple(drafts.shape)} (want [{B}, {K1 - 1}]), "
            f"uniform {tuple(uniform.shape)} (want [{B}, {K1 - 1}]), noise {tuple(noise.shape)} (want [{B}, {K1}, {V}])"
        )
    if backend.eager(logits):
        return torch_ops.accept_sampling(logits, drafts, uniform, noise, *_sampling(params))
    return torch.ops.mtp_kernels.accept_sampling(logits, drafts, uniform, noise, *_sampling(params))
