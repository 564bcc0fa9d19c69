"""`prepacked_linear(x, weight, bias)`: `F.linear` for inference on the CPU through oneDNN, with the weight
reordered once into oneDNN's blocked layout and kept.

Shapes: x [..., in] (any strides), weight [out, in], bias [out] | None -> [..., out], fp32.

Why: a decoding step feeds a few to a few dozen rows (T = 4..81 for 1..8 masks) through every projection.
PyTorch's CPU GEMM for such short products (MKL) runs far below the machine's peak, while oneDNN's, on a
weight packed ahead of time, is 1.5-3x faster from 4 rows up (measured on the project's 2-core AMD EPYC
at d = 256: 25 x 256 by 256 x 768 in 52 against 107 us, 81 rows in 134 against 299 us; one row is
slower, 18 against 11 us, which is why plain decoding keeps MKL). The results agree with F.linear's to
fp32 rounding (the two sum in different orders), as F.linear's own do across row counts.

The packed copy costs one more copy of each weight it serves; it lives as long as the weight tensor and is
rebuilt when the weight changes (in-place updates bump its version; `.to()` gives a new tensor).
`prepacked_linear` is plain `F.linear` where packing does not apply: autograd on, a dtype other than
fp32, a non-CPU tensor, `MTP_KERNELS=reference`, oneDNN disabled (`torch.backends.mkldnn.flags`) or
missing from this torch build (one warning). Decoding asks `packing_applies` once per generate call and
then calls `linear_on_packed`, which checks nothing, in each of its projections; its LM-head products go
through `choose_tokens(..., prepacked=True)` (the 4096 x 256 head over 2-9 rows: about half MKL's time).
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

from mtp_kernels import backend

# id(weight) -> (weak reference to the weight, (data pointer, version), packed copy). The weak reference's
# callback drops the entry, so a freed weight frees its copy. (A WeakKeyDictionary would compare tensors
# with ==, which is elementwise.)
_packed: dict[int, tuple] = {}


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether this torch build can run oneDNN linears on prepacked weights."""
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 3), None)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 3), weight, None, "none", [], "")
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def packing_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether fp32 products on `device` may run on packed weights here: a CPU, fp32, not
    `MTP_KERNELS=reference`, oneDNN built in (else one warning) and enabled."""
    if torch.device(device).type != "cpu" or dtype != torch.float32 or backend.mode() == "reference":
        return False
    if not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        return False
    if not onednn_available():
        backend.warn_once("mtp_kernels: this torch build cannot run oneDNN linears; CPU decoding uses F.linear")
        return False
    return True


def _packed_weight(weight: torch.Tensor) -> torch.Tensor:
    state = (weight.data_ptr(), weight._version)
    entry = _packed.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != state:
        forget = functools.partial(_packed.pop, id(weight), None)
        entry = (weakref.ref(weight, lambda _: forget()), state,
                 torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        _packed[id(weight)] = entry
    return entry[2]


def prepacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN on a packed copy of `weight` where that applies."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if needs_grad or x.dtype != weight.dtype or not packing_applies(x.device, x.dtype):
        return F.linear(x, weight, bias)
    if x.shape[-1] != weight.shape[1]:  # oneDNN's own message would not name the problem
        raise ValueError(f"x has {x.shape[-1]} features but the weight takes {weight.shape[1]}")
    return linear_on_packed(x, weight, bias)


def linear_on_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`prepacked_linear` without its checks, for a caller that made them once for many products (a
    decoding forward: no autograd, fp32 CPU tensors, `packing_applies`)."""
    return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(weight), bias, "none", [], "")
