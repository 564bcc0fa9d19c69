"""Tree attention for a verify step: T new queries over each row's cached prefix plus the new block.

Shapes: q [B, Hq, T, D]; k, v [B, Hkv, S, D] caches, row b holding its prefix in [0, lengths[b])
and this step's T new entries in [lengths[b], lengths[b] + T); block_mask [T, T] bool (True = may attend),
shared by all rows; lengths, starts [B] int: slots before starts[b] (left padding) are never attended to,
whether in the prefix or in the block. Returns [B, Hq, T, D] in q's dtype. Hq must be a multiple of
Hkv (grouped-query attention, K/V never repeated). A query that may see nothing gets a zero output.

Kernel: flash attention (online softmax in fp32) with the query heads of one KV group folded into the
rows of a tile, so each K/V tile is loaded once per group rather than once per query head. Each program
takes BLOCK_M (query, head) rows of one (batch row, KV head): first the row's prefix, where only the
bounds mask applies, then the T block keys under `block_mask`. Per-row lengths are read on the device,
so rows of any lengths share one launch with no host sync. When those programs are too few to fill the
GPU (decoding at small batch) and the cache is long, the prefix is split across programs as in
flash-decoding: each writes its unnormalised (max, sum, accumulator) and a second kernel merges them.

CPU (outside the interpreter): torch's SDPA over the live slots with a materialised [B, T, S] mask, built
once per forward and shared by its layers (`visibility_mask`, which a caller running SDPA itself can use);
`tests/reference.py` (float64) is the oracle the tests hold both paths to.

Both run inside the torch custom op `mtp_kernels::tree_attention` (fake implementation registered; not
differentiable). The public function checks shapes and dtypes, and in eager on the CPU that the lengths
fit the cache. Benchmark: `benchmarks/bench_tree_attention.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtp_kernels import backend, torch_ops
from mtp_kernels.checks import FLOAT_DTYPES, check_same_dtype, check_tensor

INDEX_DTYPES = (torch.int32, torch.int64)

if backend.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _attend_tile(q, k_ptrs, v_ptrs, load_ok, allowed, m_i, l_i, acc, scale_log2, UPCAST: tl.constexpr):
        """One online-softmax update of (m_i, l_i, acc) with a [BLOCK_N, BLOCK_D] tile of K and V.

        load_ok [BLOCK_N, BLOCK_D] bounds the loads; allowed [BLOCK_M, BLOCK_N] says which query sees
        which key.
        """
        k = tl.load(k_ptrs, mask=load_ok, other=0.0)
        v = tl.load(v_ptrs, mask=load_ok, other=0.0)
        if UPCAST:  # the interpreter (bf16 bits) and fp32 inputs (no tf32 rounding) compute in fp32
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(allowed, scores * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @backend.triton_kernel
    def _tree_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, lengths_ptr, starts_ptr, block_mask_ptr,
        part_acc_ptr, part_max_ptr, part_sum_ptr,
        B, T, D, scale_log2, split_size,
        stride_qb, stride_qh, stride_qt,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_ot,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, NUM_SPLITS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    ):
        row_block = tl.program_id(0)
        batch = tl.program_id(1) // NUM_KV_HEADS
        kv_head = tl.program_id(1) % NUM_KV_HEADS
        split = tl.program_id(2)

        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)  # folded (query t, head in group g)
        t = rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_ok = t < T
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < D

        q_ptrs = q_ptr + batch * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + dims[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        length = tl.load(lengths_ptr + batch).to(tl.int32)
        start = tl.load(starts_ptr + batch).to(tl.int32)
        k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
        v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # The cached prefix: every query sees all of it, padding excepted. Split s takes the slots
        # [s * split_size, (s + 1) * split_size); split_size is a multiple of BLOCK_N.
        every_row = row_ok[:, None] | True
        first = tl.maximum((start // BLOCK_N) * BLOCK_N, split * split_size)
        end = tl.minimum(length, (split + 1) * split_size)
        for key_start in range(first, end, BLOCK_N):
            keys = key_start + tl.arange(0, BLOCK_N)
            key_ok = (keys < end) & (keys >= start)
            m_i, l_i, acc = _attend_tile(
                q,
                k_base + keys[:, None] * stride_ks + dims[None, :],
                v_base + keys[:, None] * stride_vs + dims[None, :],
                key_ok[:, None] & dim_ok[None, :],
                every_row & key_ok[None, :],
                m_i, l_i, acc, scale_log2, UPCAST,
            )

        # This step's block, under the tree mask: the last split's work.
        block_end = tl.where(split == NUM_SPLITS - 1, T, 0)
        for block_start in range(0, block_end, BLOCK_N):
            j = block_start + tl.arange(0, BLOCK_N)
            slots = length + j
            key_ok = (j < T) & (slots >= start)
            visible = tl.load(block_mask_ptr + t[:, None] * T + j[None, :], mask=row_ok[:, None] & key_ok[None, :],
                              other=0)
            m_i, l_i, acc = _attend_tile(
                q,
                k_base + slots[:, None] * stride_ks + dims[None, :],
                v_base + slots[:, None] * stride_vs + dims[None, :],
                key_ok[:, None] & dim_ok[None, :],
                visible != 0,
                m_i, l_i, acc, scale_log2, UPCAST,
            )

        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # nothing visible: zero output
            out_ptrs = out_ptr + batch * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_ot + dims[None, :]
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
        else:  # unnormalised partial state, [NUM_SPLITS, B, Hq, T] rows, merged by _merge_splits_kernel
            part = ((split * B + batch) * (NUM_KV_HEADS * GROUP) + head) * T + t
            tl.store(part_max_ptr + part, m_i, mask=row_ok)
            tl.store(part_sum_ptr + part, l_i, mask=row_ok)
            tl.store(part_acc_ptr + part[:, None] * D + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])

    @backend.triton_kernel
    def _merge_splits_kernel(
        out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
        rows_total, H, T, D,
        stride_ob, stride_oh, stride_ot,
        NUM_SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Combines the splits' (max, sum, acc) with the online-softmax rescaling, one split at a time, and
        normalises: one row per (batch, head, query), rows_total = B * H * T of them. A loop rather than an
        unrolled one, which would hold every split's tile in registers at once."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < rows_total
        dims = tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (dims < D)[None, :]
        m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for split in range(NUM_SPLITS):
            part = split * rows_total + rows
            m_part = tl.load(part_max_ptr + part, mask=row_ok, other=float("-inf"))
            m_new = tl.maximum(m, m_part)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet by any split
            keep = tl.exp2(m - m_safe)
            weight = tl.exp2(m_part - m_safe)
            total = total * keep + weight * tl.load(part_sum_ptr + part, mask=row_ok, other=0.0)
            acc = acc * keep[:, None] + weight[:, None] * tl.load(part_acc_ptr + part[:, None] * D + dims[None, :],
                                                                  mask=ok, other=0.0)
            m = m_new
        out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        batch = rows // (H * T)
        head = (rows // T) % H
        t = rows % T
        out_ptrs = out_ptr + batch[:, None] * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_ot + dims[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=ok)


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
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
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
    # Reading lengths would sync a GPU on every layer of every step, and a compiled graph cannot branch on
    # it; in eager on the CPU it is free, so check there.
    if q.is_cuda or not B or torch.compiler.is_compiling():
        return
    if int(lengths.max()) + T > k.shape[2]:
        raise ValueError(f"lengths + T = {int(lengths.max()) + T} exceeds the cache's {k.shape[2]} slots")
    for name, values in (("lengths", lengths), ("starts", starts)):
        if values is not None and int(values.min()) < 0:
            raise ValueError(f"{name} holds a negative entry ({int(values.min())})")


class _VisibilityMemo:
    """The last call's attention mask, reused while the lengths, block mask and starts hold the same values.

    Every attention layer of one forward passes the same three tensors, so the [B, 1, T, S] mask is built
    once per forward rather than once per layer. It is additive (0 visible, -inf not) in the dtype SDPA
    runs in, since SDPA would turn a bool mask into exactly that on every call. The memo compares values,
    not identities or version counters: `kv_compact` advances the lengths in place through a compiled op,
    which bumps no version. Comparing [B] and [T, T] tensors costs nothing next to the mask, on the CPU
    where this path runs. The entry is one tuple, swapped atomically, so threads never see a torn entry.
    """

    def __init__(self):
        self._entry = None

    def get(self, lengths, block_mask, starts, dtype):
        inputs = (lengths, block_mask, starts)
        entry = self._entry
        if entry is not None and entry[1] == dtype and all(_same(a, b) for a, b in zip(entry[0], inputs)):
            return entry[2], entry[3]
        live = int(lengths.max()) + block_mask.shape[0] if lengths.numel() else 0
        visible = torch_ops.tree_attention_allowed(lengths, block_mask, live, starts)[:, None]
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
        self._entry = (tuple(None if t is None else t.clone() for t in inputs), dtype, live, mask)
        return live, mask


def _same(kept, given) -> bool:
    if kept is None or given is None:
        return kept is given
    return kept.device == given.device and torch.equal(kept, given)


_visibility = _VisibilityMemo()


def visibility_mask(lengths, block_mask, starts, dtype) -> tuple[int, torch.Tensor]:
    """(live, mask): the number of cache slots any query of the block may see, max(lengths) + T, and the
    additive SDPA mask [B, 1, T, live] in `dtype` (0 visible, -inf not) that tree attention applies over
    them. Memoised while the three inputs keep their values (every layer of a forward asks for the same)."""
    return _visibility.get(lengths, block_mask, starts, dtype)


def _dense_attention(q, k, v, lengths, block_mask, scale, starts):
    """The CPU path: SDPA with a materialised mask over the live slots (`attend_live`).

    Slots past the longest row's block are never visible, so only [0, max(lengths) + T) is read: the cost
    follows what the rows hold, not what the cache was sized for. SDPA gives a query that sees nothing a
    zero output, as the op requires.
    """
    live, mask = visibility_mask(lengths, block_mask, starts, attention_dtype(q.dtype))
    return attend_live(q, k, v, live, mask, scale)


def attention_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU path computes attention of `dtype` inputs in: fp32 (fp64 for fp64 inputs)."""
    return torch.promote_types(dtype, torch.float32)


def attend_live(q, k, v, live: int, mask, scale):
    """SDPA of q [B, Hq, T, D] over slots [0, live) of k, v [B, Hkv, S, D] under `mask` (`visibility_mask` in
    `attention_dtype(q.dtype)`), computed in that dtype and rounded to q's: the CPU path's arithmetic, for a
    caller that made the mask once for all its layers."""
    wide = mask.dtype
    out = F.scaled_dot_product_attention(
        q.to(wide), k[:, :, :live].to(wide), v[:, :, :live].to(wide), attn_mask=mask, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.to(q.dtype)


# Split the prefix across programs (flash-decoding) when one program per (row block, batch row, KV head)
# would leave most of the GPU idle: decoding (T = 1) at batch 1 has only B * Hkv programs. A split covers at
# least _SPLIT_MIN_SLOTS cache slots; the plan follows the cache's capacity, known without reading the
# lengths on the device (splits past a row's length find nothing and cost one launch slot).
_SPLIT_TARGET_PROGRAMS = 256
_SPLIT_MIN_SLOTS = 512
_MAX_SPLITS = 32


def _split_plan(programs: int, num_slots: int, block_n: int) -> tuple[int, int]:
    """(number of splits, slots per split) for the prefix; (1, any) means no split."""
    wanted = min(_MAX_SPLITS, triton.cdiv(_SPLIT_TARGET_PROGRAMS, programs), num_slots // _SPLIT_MIN_SLOTS)
    if wanted <= 1:
        return 1, triton.cdiv(num_slots, block_n) * block_n
    split_size = triton.cdiv(triton.cdiv(num_slots, wanted), block_n) * block_n
    return triton.cdiv(num_slots, split_size), split_size


def _block_sizes(rows: int, head_dim: int, on_cuda: bool, wide: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): (query, head) rows and keys per tile. On CUDA the largest tiles that ptxas
    fits in registers at 4 warps for sm_90 (no spills; tests/test_gpu_compile.py checks it); `wide` (fp32)
    tiles hold twice the bytes."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if not on_cuda:  # the interpreter's cost is per program and per op: few, large tiles
        return max(16, min(128, triton.next_power_of_2(rows))), 64, block_d
    if block_d > 128:
        return (16, 16, block_d) if wide else (16, 32, block_d) if rows <= 16 else (32, 16, block_d)
    return (16, 64, block_d) if wide or rows <= 16 else (32, 32, block_d)


def _attention(q, k, v, lengths, block_mask, scale, starts):
    """The op on checked inputs: Triton on CUDA (and in the interpreter), SDPA on the CPU."""
    B, Hq, T, D = q.shape
    if q.numel() == 0:
        return torch.empty_like(q)
    # The kernel accumulates in fp32: fp64 takes the dense path, which computes in fp64.
    if not backend.use_triton(q) or q.dtype == torch.float64:
        return _dense_attention(q, k, v, lengths, block_mask, scale, starts)
    Hkv = k.shape[1]
    group = Hq // Hkv
    starts = torch.zeros_like(lengths) if starts is None else starts
    out = torch.empty_like(q)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    block_m, block_n, block_d = _block_sizes(T * group, D, q.is_cuda, q.dtype in (torch.float32, torch.float64))
    row_blocks = triton.cdiv(T * group, block_m)
    num_splits, split_size = _split_plan(row_blocks * B * Hkv, k.shape[2], block_n)
    if num_splits > 1:
        part_max = torch.empty(num_splits, B, Hq, T, device=q.device, dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(num_splits, B, Hq, T, D, device=q.device, dtype=torch.float32)
    else:
        part_max = part_sum = part_acc = out  # not read
    _tree_attention_kernel[(row_blocks, B * Hkv, num_splits)](
        q, k, v, out, lengths.contiguous(), starts.contiguous(), block_mask.to(torch.int8).contiguous(),
        part_acc, part_max, part_sum,
        B, T, D, scale * 1.4426950408889634, split_size,  # exp2 instead of exp: fold log2(e) into the scale
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        NUM_KV_HEADS=Hkv, GROUP=group, NUM_SPLITS=num_splits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        UPCAST=(not q.is_cuda) or q.dtype == torch.float32,
    )
    if num_splits > 1:
        rows_total = B * Hq * T
        block_r = 16
        _merge_splits_kernel[(triton.cdiv(rows_total, block_r),)](
            out, part_acc, part_max, part_sum, rows_total, Hq, T, D, *out.stride()[:3],
            NUM_SPLITS=num_splits, BLOCK_R=block_r, BLOCK_D=block_d,
        )
    return out


@torch.library.custom_op(
    "mtp_kernels::tree_attention", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor lengths, Tensor block_mask, float scale, Tensor? starts) -> Tensor")
def _tree_attention_op(q, k, v, lengths, block_mask, scale, starts):
    return _attention(q, k, v, lengths, block_mask, scale, starts)


@_tree_attention_op.register_fake
def _(q, k, v, lengths, block_mask, scale, starts):
    return torch.empty_like(q)


def tree_attention(q, k, v, lengths, block_mask, scale=None, starts=None):
    """Attention of q's T new queries over each row's cached prefix plus the block (see the module docstring)."""
    _check_inputs(q, k, v, lengths, block_mask, starts)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend.eager(q):
        return _attention(q, k, v, lengths, block_mask, scale, starts)
    return torch.ops.mtp_kernels.tree_attention(q, k, v, lengths, block_mask, scale, starts)
