"""Gated LoRA linear: `x W^T + b + scaling * gate * (x A^T) B^T`, LoRA only on gated rows.

Shapes: x [..., in], weight [out, in], bias [out] | None, lora_a [r, in], lora_b [out, r], gate [...] bool
(one flag per row of x). Returns [..., out] in x's dtype. Differentiable in x, lora_a and lora_b (and in
weight and bias, if they require grad).

Forward, with no host sync:
1. `F.linear` (cuBLAS) gives the base output; this is what keeps ungated rows bit-identical to the plain layer.
2. `nonzero_static` lists the gated rows, padded with -1 to the row count.
3. The shrink kernel computes (x A^T) for BLOCK_M listed rows per program into an fp32 buffer [SPLIT_K, M, r].
   Decode has few rows and a long K (up to 14336), so K is split over SPLIT_K <= 16 programs to fill the GPU;
   each writes its partial sum (no atomics, so the result is deterministic). Ranks beyond BLOCK_R are tiled.
4. The expand kernel sums the partials and adds `scaling * (x A^T) B^T` into the listed rows of the output.
Programs whose slots lie past the gated count read only -1 and return at once: the cost follows the gated count.

Backward: torch matmuls with the gate as a row mask (training layouts gate most rows anyway).

The torch custom op `mtp_kernels::gated_lora_linear` (fake implementation and autograd registered) runs
this on CUDA tensors; on CPU tensors oneDNN on packed weights for a decoding step's rows
(`cpu_linear.gated_lora_linear`: fp32, or bf16 where oneDNN runs it natively), else
`torch_ops.gated_lora_linear`, or, with `MTP_KERNELS=interpret`, these kernels in Triton's interpreter. Under torch.compile, the public function
hands CPU tensors' work to the compiler as torch_ops' torch ops rather than as the opaque op.
Benchmark: `benchmarks/bench_gated_lora.py`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mtp_kernels import backend, cpu_linear, torch_ops
from mtp_kernels.checks import FLOAT_DTYPES, check_dim, check_same_dtype, check_tensor

if backend.HAS_TRITON:
    import triton
    import triton.language as tl

    @backend.triton_kernel
    def _shrink_kernel(
        x_ptr, a_ptr, rows_ptr, xa_ptr,
        M, K, R, K_PER_SPLIT,
        stride_xm, stride_am, stride_xas, stride_xam,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    ):
        """xa[s, i, ranks] = x[rows[i], ks] @ A[ranks, ks]^T for split s (columns ks) and one tile of ranks.

        A split that starts past K writes zeros, so every one of the SPLIT_K partials is defined.
        """
        slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(rows_ptr + slots, mask=slots < M, other=-1)
        if tl.max(rows, axis=0) < 0:  # past the gated count: nothing to do
            return
        row_ok = rows >= 0
        split = tl.program_id(1)
        ranks = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        k_start = split * K_PER_SPLIT
        k_end = tl.minimum(k_start + K_PER_SPLIT, K)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=ACC)
        for k0 in range(k_start, k_end, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)
            a = tl.load(a_ptr + ranks[None, :] * stride_am + cols[:, None], mask=rank_ok[None, :] & col_ok[:, None],
                        other=0.0)
            if UPCAST:  # out_dtype named: before Triton 3.7 it defaults to fp32, which an fp64 acc refuses
                acc = tl.dot(x.to(ACC), a.to(ACC), acc, input_precision="ieee", out_dtype=ACC)
            else:
                acc = tl.dot(x, a, acc)
        tl.store(xa_ptr + split * stride_xas + slots[:, None] * stride_xam + ranks[None, :], acc,
                 mask=row_ok[:, None] & rank_ok[None, :])

    @backend.triton_kernel
    def _expand_kernel(
        out_ptr, b_ptr, rows_ptr, xa_ptr, scaling,
        M, N, R,
        stride_om, stride_bn, stride_xas, stride_xam,
        SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        UPCAST: tl.constexpr, ACC: tl.constexpr,
    ):
        """out[rows[i], n] += scaling * (sum_s xa[s, i]) @ B[n]^T, accumulated in ACC and rounded once."""
        slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(rows_ptr + slots, mask=slots < M, other=-1)
        if tl.max(rows, axis=0) < 0:
            return
        row_ok = rows >= 0
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        delta = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            rank_ok = ranks < R
            xa_ptrs = xa_ptr + slots[:, None] * stride_xam + ranks[None, :]
            xa = tl.zeros([BLOCK_M, BLOCK_R], dtype=ACC)
            for split in tl.static_range(SPLIT_K):  # unrolled: the partial loads are issued together
                xa += tl.load(xa_ptrs + split * stride_xas, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            b = tl.load(b_ptr + cols[None, :] * stride_bn + ranks[:, None], mask=col_ok[None, :] & rank_ok[:, None],
                        other=0.0)
            if UPCAST:
                delta = tl.dot(xa, b.to(ACC), delta, input_precision="ieee", out_dtype=ACC)
            else:  # tensor cores take x A^T rounded to the weights' dtype, as peft's LoRA forward does
                delta = tl.dot(xa.to(b.dtype), b, delta)
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
        tile_ok = row_ok[:, None] & col_ok[None, :]
        base = tl.load(out_ptrs, mask=tile_ok, other=0.0).to(ACC)
        tl.store(out_ptrs, (base + scaling * delta).to(out_ptr.dtype.element_ty), mask=tile_ok)


MAX_SPLIT_K = 16


class _Plan(NamedTuple):
    block_m: int
    block_k: int
    shrink_r: int  # rank tile of the shrink kernel
    block_n: int
    expand_r: int  # rank tile of the expand kernel
    split_k: int
    k_per_split: int
    num_warps: int


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs that fill the device: its SM count on a GPU; a few in the interpreter."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _plan(rows: int, in_features: int, rank: int, on_cuda: bool, target_programs: int) -> _Plan:
    """Block sizes from a small table instead of autotuning, and the K split that fills `target_programs`.

    GPU tiles fit in registers on sm_90 (ptxas, `tests/test_gpu_compile.py::test_tiles_fit_in_registers`):
    the expand kernel holds SPLIT_K partial tiles of [BLOCK_M, expand_r] at once, so its rank tile stays at
    32; taller row tiles take 8 warps. Larger ranks loop over rank tiles."""
    rank_tile = max(16, triton.next_power_of_2(rank))
    if on_cuda:
        block_m = 16 if rows <= 1024 else 64  # many rows: taller tiles re-read B fewer times
        shrink_r, expand_r = min(64, rank_tile), min(32, rank_tile)
        block_k = 128 if shrink_r <= 32 else 64
        block_n = 64
        num_warps = 4 if block_m == 16 else 8
    else:  # interpreter: few, large programs, but still more than one K split for long rows
        block_m, block_k, block_n = 64, 128, 128
        shrink_r = expand_r = min(128, rank_tile)
        num_warps = 4
    shrink_tiles = triton.cdiv(rows, block_m) * triton.cdiv(rank, shrink_r)
    k_blocks = triton.cdiv(in_features, block_k)
    # A power of two up to 16: the expand kernel unrolls its sum over the partials, so few variants compile.
    wanted = min(MAX_SPLIT_K, k_blocks, max(1, target_programs // shrink_tiles))
    split_k = 1 << (wanted.bit_length() - 1)
    return _Plan(block_m, block_k, shrink_r, block_n, expand_r, split_k, triton.cdiv(k_blocks, split_k) * block_k,
                 num_warps)


def _lora_into(out2d, x2d, lora_a, lora_b, scaling, gate1d):
    """Adds the LoRA term into the gated rows of out2d in place (Triton); x2d, lora_a, lora_b contiguous."""
    M, K = x2d.shape
    N, R = lora_b.shape
    if M == 0:
        return out2d
    rows = torch.nonzero_static(gate1d, size=M, fill_value=-1).squeeze(1)
    wide = x2d.dtype == torch.float64  # fp64 stays fp64 end to end (gradcheck)
    plan = _plan(M, K, R, x2d.is_cuda, _target_programs(x2d.device))
    xa = torch.empty(plan.split_k, M, R, device=x2d.device, dtype=torch.float64 if wide else torch.float32)
    # fp32/fp64 inputs, and every dtype in the interpreter (which does bf16 math on raw bits), run in ACC.
    upcast = (not x2d.is_cuda) or x2d.dtype in (torch.float32, torch.float64)
    acc = tl.float64 if wide else tl.float32
    m_blocks = triton.cdiv(M, plan.block_m)
    _shrink_kernel[(m_blocks, plan.split_k, triton.cdiv(R, plan.shrink_r))](
        x2d, lora_a, rows, xa, M, K, R, plan.k_per_split,
        x2d.stride(0), lora_a.stride(0), xa.stride(0), xa.stride(1),
        BLOCK_M=plan.block_m, BLOCK_K=plan.block_k, BLOCK_R=plan.shrink_r, UPCAST=upcast, ACC=acc,
        num_warps=plan.num_warps,
    )
    _expand_kernel[(m_blocks, triton.cdiv(N, plan.block_n))](
        out2d, lora_b, rows, xa, float(scaling), M, N, R,
        out2d.stride(0), lora_b.stride(0), xa.stride(0), xa.stride(1),
        SPLIT_K=plan.split_k, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_R=plan.expand_r, UPCAST=upcast,
        ACC=acc, num_warps=plan.num_warps,
    )
    return out2d


def _forward(x, weight, bias, lora_a, lora_b, scaling, gate):
    """The op on checked inputs: Triton on CUDA (and in the interpreter); on the CPU oneDNN on packed weights
    where that applies (`cpu_linear.gated_lora_linear`), else `torch_ops`."""
    if lora_a.shape[0] == 0 or weight.numel() == 0:  # rank 0, no features in or out: the LoRA term is 0
        return F.linear(x, weight, bias)
    if not backend.use_triton(x):
        packed = cpu_linear.gated_lora_linear(x, weight, bias, lora_a, lora_b, scaling, gate)
        if packed is not None:
            return packed
        return torch_ops.gated_lora_linear(x, weight, bias, lora_a, lora_b, scaling, gate)
    # F.linear on x as given: a 1-D x takes a different BLAS path than a [1, in] one, and gate-0 rows
    # must match the caller's own F.linear(x, weight, bias) bit for bit.
    out2d = F.linear(x, weight, bias).reshape(-1, weight.shape[0])
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    _lora_into(out2d, x2d, lora_a.contiguous(), lora_b.contiguous(), scaling, gate.reshape(-1))
    return out2d.reshape(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op(
    "mtp_kernels::gated_lora_linear", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling, Tensor gate) -> Tensor")
def _gated_lora_op(x, weight, bias, lora_a, lora_b, scaling, gate):
    return _forward(x, weight, bias, lora_a, lora_b, scaling, gate)


@_gated_lora_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, gate):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, gate = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, gate)
    ctx.scaling = scaling
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    """Torch matmuls with the gate as a row mask (training layouts gate most rows anyway)."""
    x, weight, lora_a, lora_b, gate = ctx.saved_tensors
    need_x, need_weight, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    x2d = x.reshape(-1, x.shape[-1])
    dy = grad_out.reshape(-1, weight.shape[0])
    dy_gated = dy * gate.reshape(-1, 1).to(dy.dtype)  # the LoRA term only exists on gated rows
    grad_x = grad_weight = grad_bias = grad_a = grad_b = None
    if need_x or need_a:
        dy_b = dy_gated @ lora_b  # [M, r]
    if need_x:
        grad_x = (dy @ weight + ctx.scaling * (dy_b @ lora_a)).reshape(x.shape)
    if need_weight:
        grad_weight = dy.t() @ x2d
    if ctx.has_bias and need_bias:
        grad_bias = dy.sum(0)
    if need_a:
        grad_a = ctx.scaling * (dy_b.t() @ x2d)
    if need_b:
        grad_b = ctx.scaling * (dy_gated.t() @ (x2d @ lora_a.t()))
    return grad_x, grad_weight, grad_bias, grad_a, grad_b, None, None


_gated_lora_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(x, weight, bias, lora_a, lora_b, gate):
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.ndim < 1:
        raise ValueError("x must have at least 1 dim")
    device = x.device
    check_tensor("weight", weight, ndim=2, device=device)
    check_tensor("lora_a", lora_a, ndim=2, device=device)
    check_tensor("lora_b", lora_b, ndim=2, device=device)
    check_same_dtype("x", x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    out_features, in_features = weight.shape
    check_dim("x", x, -1, in_features, "weight's in_features")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=device)
        check_dim("bias", bias, 0, out_features, "weight's out_features")
    check_dim("lora_a", lora_a, 1, in_features, "weight's in_features")
    check_dim("lora_b", lora_b, 0, out_features, "weight's out_features")
    check_dim("lora_b", lora_b, 1, lora_a.shape[0], "the LoRA rank, lora_a.shape[0]")
    check_tensor("gate", gate, dtypes=(torch.bool,), device=device)
    if gate.shape != x.shape[:-1]:
        raise ValueError(f"gate has shape {tuple(gate.shape)}; it must be x's leading shape {tuple(x.shape[:-1])}")


def gated_lora_linear(x, weight, bias, lora_a, lora_b, scaling: float, gate):
    """`F.linear(x, weight, bias)`, plus `scaling * (x A^T) B^T` on the rows of x whose gate is set."""
    _check_inputs(x, weight, bias, lora_a, lora_b, gate)
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        # Traced as torch ops, which inductor fuses (and, with freezing, packs for oneDNN), where an opaque
        # op call per projection would cost a Python dispatch each (results README, "The compiled step").
        return torch_ops.gated_lora_linear(x, weight, bias, lora_a, lora_b, float(scaling), gate)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_a, lora_b))
    if not needs_grad and backend.eager(x):
        return _forward(x, weight, bias, lora_a, lora_b, float(scaling), gate)
    return torch.ops.mtp_kernels.gated_lora_linear(x, weight, bias, lora_a, lora_b, float(scaling), gate)
