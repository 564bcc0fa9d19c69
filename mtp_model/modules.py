"""The modules `patch` adds to a model: gated LoRA linears, the sampler head and the mask embeddings.

- `GateContext`: one per patched model; the model layer sets `gate` [B, S] bool (True on mask tokens)
  once per forward, and every `GatedLoRALinear` of the model reads it. `gate=None` means no mask token in
  this forward (`effective_gate`): every linear is exactly its base layer.
- `GatedLoRALinear(base, rank, alpha, context)`: `base(x) + alpha / rank * gate * B(A(x))`. Weights use
  peft's names (`lora_A.weight` [r, in], `lora_B.weight` [out, r], B zero-initialised) so adapters save
  and load in peft's layout. Its forward is the op `mtp_kernels.gated_lora_linear` (autograd included),
  except where the base is an `nn.Linear` subclass or a hook watches a layer: then the layers themselves.
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
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

import mtp_kernels
from mtp_kernels.sampler import SamplerWeights, sampler_body


class GateContext:
    """The per-forward gate shared by all gated linears of one model."""

    def __init__(self):
        self.gate: torch.Tensor | None = None

    def set(self, gate: torch.Tensor | None) -> None:
        self.gate = effective_gate(gate)


def effective_gate(gate: torch.Tensor | None) -> torch.Tensor | None:
    """The gate a forward runs under: None when it holds no mask token, which keeps every linear exactly its
    base layer, and for free. A compiled graph cannot branch on the gate's values: it keeps the gate as
    given, and its LoRA adds exact zeros to ungated rows (finite adapters are checked at load)."""
    if gate is not None and not torch.compiler.is_compiling() and not bool(gate.any()):
        return None
    return gate


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
        gate = self.context.gate
        if gate is None:
            return self.base_layer(x)
        if not self.runs_as_op():
            # The base layer's own forward and hooks run, as in stock; the LoRA term goes on the gated rows.
            base = self.base_layer(x)
            return torch.where(gate[..., None], base + self.lora_B(self.lora_A(x)) * self.scaling, base)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        lora_a, lora_b = self.lora_A.weight, self.lora_B.weight
        if torch.is_autocast_enabled(x.device.type):  # as autocast casts F.linear's inputs (mixed precision)
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, lora_a, lora_b = (t.to(dtype) for t in (x, weight, lora_a, lora_b))
            bias = None if bias is None else bias.to(dtype)
        return mtp_kernels.gated_lora_linear(x, weight, bias, lora_a, lora_b, self.scaling, gate)

    def runs_as_op(self) -> bool:
        """Whether the op computes exactly what calling the layers would: a plain `nn.Linear` base (a subclass
        may quantise, observe or otherwise change its forward) and no hooks that the op would skip."""
        layers = self._modules  # not nn.Module.__getattr__: this runs for every projection of every forward
        base = layers["base_layer"]
        if type(base) is not nn.Linear or _global_forward_hooks or _global_forward_pre_hooks:
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in (base, layers["lora_A"], layers["lora_B"]))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


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
