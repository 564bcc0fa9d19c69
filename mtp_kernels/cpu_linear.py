"""`prepacked_linear(x, weight, bias)`: `F.linear` for inference on the CPU through oneDNN, with the weight
reordered once into oneDNN's blocked layout and kept; `gated_lora_linear`: the gated LoRA op's CPU
implementation on such weights; `gated_lora_on_packed`: the gated LoRA linears of one input (a layer's q,
k and v) that way, as one product with their LoRA activations stacked under the weights.

Shapes: x [..., in] (any strides), weight [out, in], bias [out] | None -> [..., out]; fp32, or bf16 where
oneDNN runs it natively (`packing_applies`).

Why: a decoding step feeds a few to a few dozen rows through every projection, where PyTorch's CPU GEMM
(MKL) runs far below the machine's peak and oneDNN on a weight packed ahead of time does not; one row is
faster in MKL, which is why plain decoding keeps it. The results agree with F.linear's to fp32 rounding
(the two sum in different orders); in bf16, where F.linear itself runs oneDNN, they are its bits.
Benchmark: `benchmarks/bench_cpu_linear.py`; numbers in `benchmarks/results/README.md`.

The packed copy costs one more copy of each weight it serves; it lives as long as the weight tensor and is
rebuilt when the weight changes (`mtp_kernels.derived`); a tensor that requires grad is packed (or
merged) only inside a generate call (`derived.trusted`). `prepacked_linear` is plain `F.linear` where
packing does not apply: autograd on, such a trainable weight, a dtype other than fp32 (or bf16 where oneDNN
runs it natively), a non-CPU tensor, `MTP_KERNELS=torch`, oneDNN disabled (`torch.backends.mkldnn.flags`)
or missing from this torch build (one warning). Decoding asks `packing_applies` once per generate call and then calls `linear_on_packed`,
which checks nothing.

Merged LoRA (`gated_lora_on_packed(..., merge=True)`): the LoRA term of the gated rows (a step's mask
tokens) by one product against the packed pair [W; W + scaling B A], each row keeping the half its gate
selects, instead of the stacked product's two more small ops (the gate, the B product). It reads twice
the weights, so it pays only where a step's fixed per-op costs dominate: few rows and small weights
(`merged_lora_applies`, which the op asks), and a model whose weights, doubled, stay near the cache
(`merged_lora_fits`, which `step_forward` also asks); a model that streams its weights from memory pays
the doubled width in full.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mtp_kernels import backend, torch_ops
from mtp_kernels.derived import derived, trusted

# Where merging the LoRA into a second copy of the weight beats adding it (see gated_lora_on_packed): up to
# this many rows, and weights of up to this many elements (4 MB of fp32; past that a product's cost is its
# bytes, and twice the width would cost twice as much).
MERGED_LORA_MAX_ROWS = 32
MERGED_LORA_MAX_WEIGHT = 1 << 20
# ... and only for models whose gated weights, doubled, stay near the last-level cache (32 MB of fp32): a
# model that streams its weights from memory pays the doubled width in full at every step.
MERGED_LORA_MAX_MODEL = 1 << 23
# The gated LoRA op runs on packed weights up to this many rows (a decoding step's, a short prefill's);
# longer inputs (long prompts, training batches) run F.linear, as fast there, without packed copies.
PACKED_MAX_ROWS = 512


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether this torch build can run oneDNN linears on prepacked weights."""
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 3), None)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 3), weight, None, "none", [], "")
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=None)
def onednn_runs_bf16() -> bool:
    """Whether this CPU's oneDNN runs bf16 products natively (AVX-512 or AMX); elsewhere it would emulate them."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def packing_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether products in `dtype` on `device` may run on packed weights here: a CPU, fp32 (or bf16 where
    `onednn_runs_bf16`), not `MTP_KERNELS=torch`, oneDNN built in (else one warning) and enabled."""
    if torch.device(device).type != "cpu" or backend.mode() == "torch":
        return False
    if dtype != torch.float32 and not (dtype == torch.bfloat16 and onednn_runs_bf16()):
        return False
    if not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        return False
    if not onednn_available():
        backend.warn_once("mtp_kernels: this torch build cannot run oneDNN linears; CPU decoding uses F.linear")
        return False
    return True


def _packed_weight(weight: torch.Tensor) -> torch.Tensor:
    return derived("packed", (weight,), lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))


def prepacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN on a packed copy of `weight` where that applies."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    odd_bias = bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != x.dtype)
    if needs_grad or odd_bias or not trusted(weight) or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)  # and F.linear's errors
    if not packing_applies(x.device, x.dtype):
        return F.linear(x, weight, bias)
    if x.shape[-1] != weight.shape[1]:  # oneDNN's own message would not name the problem
        raise ValueError(f"x has {x.shape[-1]} features but the weight takes {weight.shape[1]}")
    return linear_on_packed(x, weight, bias)


def linear_on_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`prepacked_linear` without its checks, for a caller that made them once for many products (a
    decoding forward: no autograd, CPU tensors of one dtype, `packing_applies`)."""
    bias = None if bias is None else bias.contiguous()  # oneDNN reads the bias as contiguous, whatever its strides
    return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(weight), bias, "none", [], "")


def packed_row_mask(gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gate [...] as the [M, 1] column of ones (gated rows) and zeros that `gated_lora_on_packed` takes,
    in the dtype of its inputs, which its LoRA activations come out of the packed product in."""
    return gate.reshape(-1, 1).to(dtype)


def merged_lora_fits(model_weight_elements: int) -> bool:
    """Whether a model whose gated linears hold this many weight elements in all may use merged products."""
    return 2 * model_weight_elements <= MERGED_LORA_MAX_MODEL


def merged_lora_applies(rows: int, weight_elements: int) -> bool:
    """Whether `gated_lora_on_packed` is the faster way to run a gated LoRA linear over `rows` rows, for
    weights of `weight_elements` elements in all."""
    return rows <= MERGED_LORA_MAX_ROWS and weight_elements <= MERGED_LORA_MAX_WEIGHT


def gated_lora_on_packed(x: torch.Tensor, members, gate: torch.Tensor | None, merge: bool,
                         row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The gated LoRA linears of one x [..., T, in] under one gate [..., T] bool (None: no gated row),
    members [(weight, bias, lora_a, lora_b, scaling)] (a single linear; or a layer's q, k, v, or its gate and
    up): the members' `x W^T + b + scaling * gate * (x A^T) B^T` side by side, [..., T, out_1 + .. + out_n],
    with `linear_on_packed`'s preconditions; possibly a view of a wider product (strided rows).
    row_mask: `packed_row_mask(gate, x.dtype)`, from a caller that runs many products under one gate.

    merge=False: one product against the packed [W_1; ..; W_n; A_1; ..; A_n] gives every row its base
    outputs and its LoRA activations; the gated rows' activations go through one product with the
    block-diagonal [s_1 B_1, .., s_n B_n], added in place: three ops for all members where a product and a
    LoRA term per member take four each. merge=True: one product against the packed [W_1; ..; W_n; W_1 +
    s_1 B_1 A_1; ..] (biases [b; b]) gives every row both its base and its LoRA-merged outputs, and each row
    keeps the half its gate selects: two ops, reading twice the weights, which pays up to
    `merged_lora_applies`' size (module docstring). Either way ungated rows are the plain packed product, up
    to oneDNN's blocking. In bf16 the gated rows' LoRA term rounds to bf16 (the activations, then the sum)
    where the op's definition rounds it once from fp32: a difference within bf16 rounding, on mask rows only.
    """
    width = sum(member[0].shape[0] for member in members)
    scalings = tuple(member[4] for member in members)
    if merge:
        sources = tuple(tensor for weight, bias, lora_a, lora_b, _ in members
                        for tensor in (weight, lora_a, lora_b, bias) if tensor is not None)
        packed_pair, pair_bias = derived("merged-lora", sources, lambda: _merged_pair(members), *scalings)
        both = torch.ops.mkldnn._linear_pointwise(x, packed_pair, pair_bias, "none", [], "")
        out = both[..., :width] if gate is None else torch.where(gate[..., None], both[..., width:], both[..., :width])
    else:
        sources = tuple(tensor for weight, bias, lora_a, _, _ in members
                        for tensor in (weight, lora_a, bias) if tensor is not None)
        packed, bias = derived("lora-stacked", sources, lambda: _stacked(members))
        both = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        out = both[..., :width]
        if gate is not None:
            expand = derived("lora-expand", tuple(member[3] for member in members),
                             lambda: torch.block_diag(*(scaling * lora_b for *_, lora_b, scaling in members)).t(),
                             *scalings)
            if row_mask is None:
                row_mask = packed_row_mask(gate, x.dtype)
            activations = both[..., width:].reshape(-1, expand.shape[0]) * row_mask
            out.view(-1, width).addmm_(activations, expand)
    return out


def _stacked(members) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The packed [W_1; ..; W_n; A_1; ..; A_n] and its bias [b_1; ..; b_n; 0] (None without biases)."""
    weights = [weight for weight, *_ in members] + [lora_a for _, _, lora_a, _, _ in members]
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat(weights), None)
    if all(bias is None for _, bias, *_ in members):
        return packed, None
    biases = [weight.new_zeros(weight.shape[0]) if bias is None else bias for weight, bias, *_ in members]
    return packed, torch.cat(biases + [members[0][0].new_zeros(sum(a.shape[0] for _, _, a, _, _ in members))])


def _merged_pair(members) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The packed [W_1; ..; W_n; W_1 + s_1 B_1 A_1; ..] and its bias [b; b] (None without biases)."""
    weights = [weight for weight, *_ in members]
    merged = [(weight.double() + scaling * (lora_b.double() @ lora_a.double())).to(weight.dtype)
              for weight, _, lora_a, lora_b, scaling in members]
    pair = torch.ops.mkldnn._reorder_linear_weight(torch.cat(weights + merged), None)
    if all(bias is None for _, bias, *_ in members):
        return pair, None
    biases = [weight.new_zeros(weight.shape[0]) if bias is None else bias for weight, bias, *_ in members]
    return pair, torch.cat(biases + biases)


def gated_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, scaling: float, gate: torch.Tensor) -> torch.Tensor | None:
    """The gated LoRA op's CPU implementation on packed weights (`mtp_kernels.gated_lora_linear`, checked
    inputs), or None where it does not apply: not fp32 CPU tensors with packing available, an x without
    rows or features, more than `PACKED_MAX_ROWS` rows, or a trainable base weight or bias outside a
    generate call. Trainable LoRA factors there (a patched model's, in training and in `mtp_loss`) add
    their term from the live factors onto the packed base product (`derived.trusted`)."""
    rows = x.numel() // x.shape[-1] if x.ndim >= 2 and x.shape[-1] > 0 else 0
    if not 0 < rows <= PACKED_MAX_ROWS or weight.dtype != x.dtype or not packing_applies(x.device, x.dtype):
        return None
    if not trusted(weight, bias):
        return None
    if not trusted(lora_a, lora_b):
        return torch_ops.add_masked_lora(linear_on_packed(x, weight, bias), x, lora_a, lora_b, scaling,
                                         torch_ops.lora_row_mask(gate, x.dtype))
    merge = merged_lora_applies(rows, weight.numel())
    return gated_lora_on_packed(x, [(weight, bias, lora_a, lora_b, scaling)], gate, merge).contiguous()
