"""Gated LoRA linear: `x W^T + b + scaling * gate * (x A^T) B^T`, LoRA only on gated rows.

Shapes: x [..., in], weight [out, in], bias [out] | None, lora_a [r, in], lora_b [out, r], gate [...] bool
(one flag per row of x). Returns [..., out] in x's dtype.

(Triton kernels: to be added; until then every device uses the torch reference.)
"""

from __future__ import annotations

import torch

from mtp_kernels import reference
from mtp_kernels.checks import FLOAT_DTYPES, check_dim, check_same_dtype, check_tensor


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
    return reference.gated_lora_linear(x, weight, bias, lora_a, lora_b, scaling, gate)
