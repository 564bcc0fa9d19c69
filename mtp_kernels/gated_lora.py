"""Gated LoRA linear: `x W^T + b + scaling * gate * (x A^T) B^T`, LoRA only on gated rows.

Shapes: x [..., in], weight [out, in], bias [out] | None, lora_a [r, in], lora_b [out, r], gate [...] bool
(one flag per row of x). Returns [..., out] in x's dtype. Differentiable in x, lora_a and lora_b (and in
weight and bias, if they require grad).

Forward: the base product is `F.linear` (cuBLAS), which is what keeps ungated rows bit-identical to the
plain layer. The LoRA part runs on the gated rows only, with no host sync: `nonzero_static` lists them
(padded with -1 to the row count), a shrink kernel computes (x A^T) for BLOCK_M listed rows at a time
into an fp32 buffer, and an expand kernel adds `scaling * (x A^T) B^T` into those rows of the base output.
Programs past the gated count find only -1 and return at once, so the cost follows the gated count.
Backward: torch matmuls with the gate as a row mask (training layouts gate most rows anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtp_kernels import backend, reference
from mtp_kernels.checks import FLOAT_DTYPES, check_dim, check_same_dtype, check_tensor

if backend.HAS_TRITON:
    import triton
    import triton.language as tl

    @backend.triton_kernel
    def _shrink_kernel(
        x_ptr, a_ptr, rows_ptr, xa_ptr,
        M, K, R,
        stride_xm, stride_am, stride_xam,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    ):
        """xa[i] = x[rows[i]] @ A^T for the listed rows i of this program (in ACC: fp32, or fp64 for fp64)."""
        slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(rows_ptr + slots, mask=slots < M, other=-1)
        if tl.max(rows, axis=0) < 0:  # past the gated count: nothing to do
            return
        row_ok = rows >= 0
        ranks = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :],
                        other=0.0)
            a = tl.load(a_ptr + ranks[None, :] * stride_am + cols[:, None], mask=(ranks < R)[None, :] & (cols < K)[:, None],
                        other=0.0)
            if UPCAST:
                acc += tl.dot(x.to(ACC), a.to(ACC), input_precision="ieee")
            else:
                acc += tl.dot(x, a)
        tl.store(xa_ptr + slots[:, None] * stride_xam + ranks[None, :], acc,
                 mask=row_ok[:, None] & (ranks < R)[None, :])

    @backend.triton_kernel
    def _expand_kernel(
        out_ptr, b_ptr, rows_ptr, xa_ptr, scaling,
        M, N, R,
        stride_om, stride_bn, stride_xam,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    ):
        """out[rows[i], n] += scaling * xa[i] @ B[n]^T, in fp32, rounded once to out's dtype."""
        slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(rows_ptr + slots, mask=slots < M, other=-1)
        if tl.max(rows, axis=0) < 0:
            return
        row_ok = rows >= 0
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ranks = tl.arange(0, BLOCK_R)
        xa = tl.load(xa_ptr + slots[:, None] * stride_xam + ranks[None, :], mask=row_ok[:, None] & (ranks < R)[None, :],
                     other=0.0)
        b = tl.load(b_ptr + cols[None, :] * stride_bn + ranks[:, None], mask=col_ok[None, :] & (ranks < R)[:, None],
                    other=0.0)
        if UPCAST:
            delta = tl.dot(xa, b.to(ACC), input_precision="ieee")
        else:
            delta = tl.dot(xa.to(b.dtype), b)
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
        tile_ok = row_ok[:, None] & col_ok[None, :]
        base = tl.load(out_ptrs, mask=tile_ok, other=0.0).to(ACC)
        tl.store(out_ptrs, (base + scaling * delta).to(out_ptr.dtype.element_ty), mask=tile_ok)


def _block_sizes(rank: int, on_cuda: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R): a small table instead of autotuning."""
    block_r = max(16, triton.next_power_of_2(rank))
    if not on_cuda:  # interpreter: few, large programs
        return 64, 128, 128, block_r
    if block_r >= 128:
        return 16, 64, 64, block_r
    return 16, 128, 128, block_r


def _lora_into(out2d, x2d, lora_a, lora_b, scaling, gate1d):
    """Adds the LoRA term into the gated rows of out2d in place (Triton)."""
    M, K = x2d.shape
    N, R = lora_b.shape
    if M == 0:
        return out2d
    rows = torch.nonzero_static(gate1d, size=M, fill_value=-1).squeeze(1)
    wide = x2d.dtype == torch.float64  # fp64 stays fp64 end to end (gradcheck)
    xa = torch.empty(M, R, device=x2d.device, dtype=torch.float64 if wide else torch.float32)
    block_m, block_k, block_n, block_r = _block_sizes(R, x2d.is_cuda)
    upcast = (not x2d.is_cuda) or x2d.dtype in (torch.float32, torch.float64)
    acc = tl.float64 if wide else tl.float32
    _shrink_kernel[(triton.cdiv(M, block_m),)](
        x2d, lora_a, rows, xa, M, K, R, x2d.stride(0), lora_a.stride(0), xa.stride(0),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, UPCAST=upcast, ACC=acc,
    )
    _expand_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        out2d, lora_b, rows, xa, float(scaling), M, N, R, out2d.stride(0), lora_b.stride(0), xa.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, UPCAST=upcast, ACC=acc,
    )
    return out2d


class _GatedLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, gate):
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        out2d = F.linear(x2d, weight, bias)
        _lora_into(out2d, x2d, lora_a.contiguous(), lora_b.contiguous(), scaling, gate.reshape(-1))
        ctx.save_for_backward(x2d, weight, lora_a, lora_b, gate.reshape(-1))
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return out2d.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight, lora_a, lora_b, gate = ctx.saved_tensors
        dy = grad_out.reshape(-1, weight.shape[0])
        dy_gated = dy * gate[:, None].to(dy.dtype)  # the LoRA term only exists on gated rows
        dy_b = dy_gated @ lora_b  # [M, r]
        grad_x = grad_weight = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (dy @ weight + ctx.scaling * (dy_b @ lora_a)).reshape(*grad_out.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_weight = dy.t() @ x2d
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = dy.sum(0)
        if ctx.needs_input_grad[3]:
            grad_a = ctx.scaling * (dy_b.t() @ x2d)
        if ctx.needs_input_grad[4]:
            grad_b = ctx.scaling * (dy_gated.t() @ (x2d @ lora_a.t()))
        return grad_x, grad_weight, grad_bias, grad_a, grad_b, None, None


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
    _check_inputs(x, weight, bias, lora_a, lora_b, gate)
    if backend.use_triton(x):
        return _GatedLoRAFunction.apply(x, weight, bias, lora_a, lora_b, scaling, gate)
    return reference.gated_lora_linear(x, weight, bias, lora_a, lora_b, scaling, gate)
