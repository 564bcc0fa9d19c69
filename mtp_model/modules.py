"""The modules `patch` adds to a model: gated LoRA linears, the sampler head and the mask embeddings.

- `GateContext`: one per patched model; the model layer sets `gate` [B, S] bool (True on mask tokens)
  once per forward, and every `GatedLoRALinear` of the model reads it. `gate=None` means no mask token in
  this forward: every linear is exactly its base layer. `prepacked=True` (decoding's forwards, once
  `cpu_linear.packing_applies`) runs the base products through oneDNN on prepacked weights
  (`mtp_kernels.cpu_linear`), faster for a step's few rows (benchmarks/bench_cpu_linear.py) and equal
  to F.linear up to fp32 rounding; it is for inference only (no autograd).
- `GatedLoRALinear(base, rank, alpha, context)`: `base(x) + alpha / rank * gate * B(A(x))`. Weights use
  peft's names (`lora_A.weight` [r, in], `lora_B.weight` [out, r], B zero-initialised) so adapters save
  and load in peft's layout. Its forward is the op `mtp_kernels.gated_lora_linear` (autograd included),
  except in a `prepacked` forward: there a gate that is the same suffix of every row
  (`GateContext.gated_from`: a decoding step's masks come last) over few rows runs each linear as one
  product against its weight paired with its LoRA-merged copy (`cpu_linear.gated_lora_on_packed`), and
  other gates the packed product plus the masked LoRA term. `gated_lora_prepacked` is that prepacked
  product as a function of the weights, which `step_forward` calls without the module.
- `SamplerHead(hidden_size)`: `[embed(prev); z]` [N, 2d] -> Linear -> SiLU -> LayerNorm -> Linear -> SiLU
  -> LayerNorm -> [N, d] (with `residual`, z + a learned scale, from 0, times that); its output goes
  through the model's own LM head. `weights()` hands its tensors
  to the draft chain op (`mtp_kernels.draft_chain`), which computes the input layer's two halves apart.
- `MTPHead`: holds the mask embeddings [k, d] and the sampler, registered on the model as `model.mtp`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import mtp_kernels
from mtp_kernels import reference
from mtp_kernels.cpu_linear import gated_lora_on_packed, linear_on_packed, merged_lora_applies
from mtp_kernels.sampler import SamplerWeights, sampler_body


class GateContext:
    """The per-forward gate shared by all gated linears of one model."""

    def __init__(self):
        self.gate: torch.Tensor | None = None
        self.prepacked = False
        self.gated_from: int | None = None  # s when every row's gate is the same suffix [s, T) (prepacked only)
        self.merge_allowed = True  # set by patch: the model is small enough for merged-LoRA products
        self._row_mask: tuple | None = None  # (gate, input dtype, its row mask)

    def set(self, gate: torch.Tensor | None, prepacked: bool = False) -> None:
        # A gate with no mask token is the same as no gate; skipping LoRA then keeps the base path exact
        # and free. A compiled graph cannot branch on the gate's values: it keeps the gate as given, and
        # its LoRA adds exact zeros to ungated rows (finite adapters are checked at load).
        if gate is not None and not torch.compiler.is_compiling() and not bool(gate.any()):
            gate = None
        self.gate = gate
        self.prepacked = prepacked
        self.gated_from = _suffix_start(self.gate) if prepacked and self.gate is not None else None

    def merges_lora(self, rows: int, weight_elements: int) -> bool:
        """Whether a prepacked linear of this forward runs as one product against its LoRA-merged pair."""
        return self.gated_from is not None and self.merge_allowed and merged_lora_applies(rows, weight_elements)

    def row_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """`reference.lora_row_mask(gate, dtype)`, converted once per gate instead of once per linear."""
        # Keyed on the gate object, not on set(): activation checkpointing assigns `gate` directly.
        cached = self._row_mask
        if cached is None or cached[0] is not self.gate or cached[1] != dtype:
            cached = self._row_mask = (self.gate, dtype, reference.lora_row_mask(self.gate, dtype))
        return cached[2]


def _suffix_start(gate: torch.Tensor) -> int | None:
    """s where gate [..., T] is True exactly on positions s..T-1 of every row (a decoding step's mask tokens
    come after its regular ones), else None."""
    start = gate.shape[-1] - int(gate.reshape(-1, gate.shape[-1])[0].sum())
    suffix = torch.arange(gate.shape[-1], device=gate.device) >= start
    return start if bool((gate == suffix).all()) else None


class GatedLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, context: GateContext):
        super().__init__()
        self.base_layer = base
        self.rank = rank
        self.scaling = alpha / rank
        self.context = context
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        # peft's init: A Kaiming-uniform, B zero, so a fresh adapter leaves the mask path at the base model.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.context
        gate = context.gate
        if gate is None:
            return self.base_layer(x)
        base, lora_a, lora_b = self.base_layer.weight, self.lora_A.weight, self.lora_B.weight
        if context.prepacked and base.dtype == torch.float32:  # a CPU decoding forward (see GateContext)
            if gate.shape != x.shape[:-1]:
                raise ValueError(f"gate has shape {tuple(gate.shape)} but x's leading shape is {tuple(x.shape[:-1])}")
            return gated_lora_prepacked(x, base, self.base_layer.bias, lora_a, lora_b, self.scaling, context)
        return mtp_kernels.gated_lora_linear(x, base, self.base_layer.bias, lora_a, lora_b, self.scaling, gate)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def gated_lora_prepacked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                         lora_b: torch.Tensor, scaling: float, context: GateContext) -> torch.Tensor:
    """A gated LoRA linear in a prepacked forward (fp32 CPU decoding, no checks): the plain packed product
    without a gate, one product against the LoRA-merged pair for a suffix gate over few rows, else the
    packed product plus the masked LoRA term."""
    if context.gate is None:
        return linear_on_packed(x, weight, bias)
    if context.merges_lora(x.numel() // x.shape[-1], weight.numel()):
        return gated_lora_on_packed(x, weight, bias, lora_a, lora_b, scaling, context.gated_from)
    out = linear_on_packed(x, weight, bias)
    return reference.add_masked_lora(out, x, lora_a, lora_b, scaling, context.row_mask(x.dtype))


class SamplerHead(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, residual: bool = False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        # residual: the output is the mask state plus a learned correction scaled from 0, so an untrained
        # sampler drafts what the plain LM head on the mask state would.
        self.residual_scale = nn.Parameter(torch.zeros(1, **factory)) if residual else None
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden_size, hidden_size, **factory),
            nn.SiLU(),
            nn.LayerNorm(hidden_size, eps=eps, **factory),
            nn.Linear(hidden_size, hidden_size, **factory),
            nn.SiLU(),
            nn.LayerNorm(hidden_size, eps=eps, **factory),
        )

    @property
    def input_layer(self) -> nn.Linear:
        """The first Linear, over [embed(previous token); mask hidden state]."""
        return self.mlp[0]

    def weights(self) -> SamplerWeights:
        """The tensors the draft chain op takes (`mtp_kernels.draft_chain`)."""
        first, _, first_norm, second, _, second_norm = self.mlp
        return SamplerWeights(first.weight, first.bias, first_norm.weight, first_norm.bias, second.weight,
                              second.bias, second_norm.weight, second_norm.bias, self.residual_scale, first_norm.eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [..., 2d] = cat([embed(previous token), mask hidden state]) -> [..., d]."""
        latent = features[..., features.shape[-1] // 2 :]
        return sampler_body(F.linear(features, self.input_layer.weight, self.input_layer.bias), latent, self.weights())


class MTPHead(nn.Module):
    """Mask-token embeddings (frozen, as in the paper), the sampler head and, when drafts come from part of
    the vocabulary, `draft_tokens` [V_d] (sorted token ids, set from training data by `set_draft_tokens`)."""

    def __init__(self, num_masks: int, hidden_size: int, init_std: float, draft_vocab_size: int | None = None,
                 sampler_residual: bool = False, device=None, dtype=None):
        super().__init__()
        embeddings = torch.randn(num_masks, hidden_size, device=device, dtype=torch.float32) * init_std
        self.mask_embeddings = nn.Parameter(embeddings.to(dtype), requires_grad=False)
        self.sampler = SamplerHead(hidden_size, residual=sampler_residual, device=device, dtype=dtype)
        if draft_vocab_size is not None:
            self.register_buffer("draft_tokens", torch.arange(draft_vocab_size, device=device))
        else:
            self.draft_tokens = None

    def set_draft_tokens(self, token_ids: torch.Tensor, vocab_size: int) -> None:
        """Sets the draft vocabulary (distinct ids in [0, vocab_size), as many as the config says)."""
        token_ids = torch.as_tensor(token_ids).flatten()
        if self.draft_tokens is None or token_ids.shape != self.draft_tokens.shape:
            expected = None if self.draft_tokens is None else self.draft_tokens.numel()
            raise ValueError(f"the adapter's draft vocabulary holds {expected} tokens; got {token_ids.numel()}")
        check_draft_tokens(token_ids, vocab_size, "the draft vocabulary")
        self.draft_tokens.copy_(token_ids.sort().values)

    @property
    def num_masks(self) -> int:
        return self.mask_embeddings.shape[0]


def check_draft_tokens(token_ids: torch.Tensor, vocab_size: int, owner: str) -> None:
    if token_ids.dtype not in (torch.int32, torch.int64) or token_ids.ndim != 1:
        raise ValueError(f"{owner} must be a 1-D tensor of token ids, got {token_ids.dtype} {tuple(token_ids.shape)}")
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab_size):
        raise ValueError(f"{owner} holds ids outside the vocabulary [0, {vocab_size})")
    if token_ids.unique().numel() != token_ids.numel():
        raise ValueError(f"{owner} holds repeated token ids")
