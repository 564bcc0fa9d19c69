"""The decoder stack's forward for CPU decoding, written out: `StepForward.build(model)(embeds, positions,
cache, block_mask, gate) -> last hidden states`.

Shapes: embeds [B, T, d] (mask tokens included), positions [B, T], cache an `MTPCache`, block_mask [T, T]
bool, gate [B, T] bool (mask tokens) or None; returns [B, T, d] after the final norm, as `model.model(...)`
returns it through the MTP attention.

It computes what the modeling files of the families `patch` supports (Llama, Mistral, Qwen2, Qwen3)
compute, in the same order: per layer RMSNorm; the q, k, v projections (with their biases where the model
has them) viewed [B, T, H, D]; Qwen3's per-head q and k norms; the rotary embedding (rotate-half, cos and
sin from the model's own `rotary_emb`, so every rope type it knows); the step's keys and values written
into the cache; SDPA under the step's visibility mask (grouped-query, the module's `scaling`, in fp32 as
tree attention's CPU path computes it); o_proj and the residual; RMSNorm, down(act(gate) * up) and the
residual; then the final norm. Projections are the
patch's gated LoRA products on prepacked weights, as the op's CPU path runs them, except that q, k and v
(and gate and up) run as one product each (`cpu_linear.gated_lora_on_packed`), and merged LoRA only for
models small enough (`cpu_linear.merged_lora_fits`).
The hidden states and cache entries are those of the model's own forward to rounding (bit for bit on the
project's machines in fp32, and on the regular tokens in bf16: oneDNN sums each output the same way
whatever the product's width).

Why: a decoding step on a small model is a few hundred small ops, and on the CPU each one's Python cost
shows. The modeling files route every layer through module calls, keyword plumbing, the attention
interface, the cache's `update` and tree attention's per-call input checks; here the per-forward work
(rotary, cache index, visibility mask) is done once and each layer is its arithmetic. What that saves on
the demo model is in benchmarks/results/README.md ("The step forward").

Used by `decoding` only on its prepacked path (CPU inference in a dtype `cpu_linear.packing_applies` to: fp32,
or bf16 where oneDNN runs it natively) and only when `build` recognises every piece: the stock
decoder-layer classes of those families, plain or gated-LoRA linears with weights in the model's dtype,
RMSNorms, and no forward hooks on the decoder stack (this path would skip them). Anything else returns None
and decoding calls the model's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtp_kernels.cpu_linear import (gated_lora_on_packed, linear_on_packed, merged_lora_applies, merged_lora_fits,
                                    packed_row_mask)
from mtp_kernels.tree_attention import attend_live, attention_dtype, visibility_mask
from mtp_model.modules import GatedLoRALinear

# (transformers modeling module, decoder model class, decoder layer class) of the stock families.
_STOCK_CLASSES = {
    ("transformers.models.llama.modeling_llama", "LlamaModel", "LlamaDecoderLayer"),
    ("transformers.models.mistral.modeling_mistral", "MistralModel", "MistralDecoderLayer"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2Model", "Qwen2DecoderLayer"),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3Model", "Qwen3DecoderLayer"),
}
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class _Projection:
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None  # None: a plain linear
    lora_b: torch.Tensor | None
    scaling: float

    def member(self) -> tuple:
        """(weight, bias, lora_a, lora_b, scaling), as `cpu_linear.gated_lora_on_packed` takes each linear."""
        return self.weight, self.bias, self.lora_a, self.lora_b, self.scaling

    def __call__(self, x: torch.Tensor, gating: _Gating) -> torch.Tensor:
        if self.lora_a is None:
            return linear_on_packed(x, self.weight, self.bias)
        return gated_lora_on_packed(x, (self.member(),), gating.gate, gating.merge(self.weight.numel()),
                                    gating.row_mask)


@dataclass(frozen=True)
class _ProjectionGroup:
    """Projections of one input (q, k, v; gate, up), their outputs side by side: one product for all of them
    where each has LoRA (`cpu_linear.gated_lora_on_packed`), else each on its own."""

    projections: tuple[_Projection, ...]
    members: tuple | None  # each projection's `member()`, read once; None unless all have LoRA
    weight_elements: int

    @classmethod
    def of(cls, *projections: _Projection) -> _ProjectionGroup:
        members = tuple(p.member() for p in projections) if all(p.lora_a is not None for p in projections) else None
        return cls(projections, members, sum(p.weight.numel() for p in projections))

    def __call__(self, x: torch.Tensor, gating: _Gating) -> torch.Tensor:
        if self.members is not None:
            return gated_lora_on_packed(x, self.members, gating.gate, gating.merge(self.weight_elements),
                                        gating.row_mask)
        return torch.cat([projection(x, gating) for projection in self.projections], dim=-1)


@dataclass(frozen=True)
class _Gating:
    """One forward's gate in the forms its products take: gate [B, T] bool (None: no mask token), its LoRA
    row mask (`packed_row_mask`, made once for every product), and whether merged LoRA is allowed at its
    row count."""

    gate: torch.Tensor | None
    row_mask: torch.Tensor | None
    rows: int
    merge_allowed: bool

    @classmethod
    def of(cls, gate: torch.Tensor | None, dtype: torch.dtype, merge_allowed: bool) -> _Gating:
        if gate is None:
            return cls(None, None, 0, False)
        return cls(gate, packed_row_mask(gate, dtype), gate.numel(), merge_allowed)

    def merge(self, weight_elements: int) -> bool:
        return self.merge_allowed and merged_lora_applies(self.rows, weight_elements)


@dataclass(frozen=True)
class _Norm:
    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the modeling files' RMSNorm, bit for bit, in one op
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Theirs, step by step: normalised in fp32, rounded to x's dtype, then scaled by the weight.
        wide = x.float()
        return self.weight * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


@dataclass(frozen=True)
class _Layer:
    input_norm: _Norm
    qkv: _ProjectionGroup
    q_norm: _Norm | None  # Qwen3's per-head norms
    k_norm: _Norm | None
    o: _Projection
    post_norm: _Norm
    gate_up: _ProjectionGroup
    down: _Projection
    act: nn.Module
    head_dim: int
    q_heads: int
    kv_heads: int
    scaling: float

    def projections(self) -> tuple[_Projection, ...]:
        return (*self.qkv.projections, self.o, *self.gate_up.projections, self.down)


class StepForward:
    """One model's decoder stack, read once per generate call into plain tensors."""

    def __init__(self, model, layers: list[_Layer], final_norm: _Norm, merge_allowed: bool):
        self.rotary = model.model.rotary_emb
        self.layers = layers
        self.final_norm = final_norm
        self.merge_allowed = merge_allowed

    @classmethod
    def build(cls, model) -> StepForward | None:
        """The written-out forward of a patched `model`, or None where it would not compute what the model's
        own forward computes."""
        decoder = model.model
        used = decoder.layers[: model.config.num_hidden_layers]  # what the modeling files run
        if not _is_stock(decoder, [type(layer) for layer in used]) or _has_hooks(decoder):
            return None
        try:
            layers = [_read_layer(layer, model.dtype) for layer in used]
            final_norm = _norm(decoder.norm)
        except _Unsupported:
            return None
        if not hasattr(decoder, "rotary_emb"):
            return None
        gated_weights = sum(p.weight.numel() for layer in layers for p in layer.projections() if p.lora_a is not None)
        return cls(model, layers, final_norm, merged_lora_fits(gated_weights))

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, cache, block_mask: torch.Tensor,
                 gate: torch.Tensor | None) -> torch.Tensor:
        """gate: [B, T] bool, True on mask tokens, or None when the step has none (`effective_gate`)."""
        B, T, _ = embeds.shape
        gating = _Gating.of(gate, embeds.dtype, self.merge_allowed)
        cos, sin = self.rotary(embeds, positions)  # [B, T, D]
        half = cos.shape[-1] // 2
        # rotate_half(x) * sin = roll(x, half) * sin with its first half negated: one roll per tensor instead of
        # two slices, a negation and a cat (the same products, so the same values).
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        cos, sin = cos[:, :, None], sin[:, :, None]  # over the heads of [B, T, H, D]
        live, mask = visibility_mask(cache.lengths, block_mask, cache.starts, attention_dtype(embeds.dtype))
        index = cache.write_index(T)
        hidden = embeds
        for layer, cache_layer in zip(self.layers, cache.layers):
            x = layer.input_norm(hidden)
            qkv = layer.qkv(x, gating).view(B, T, -1, layer.head_dim)
            H, qk_heads = layer.q_heads, layer.q_heads + layer.kv_heads
            if layer.q_norm is None:  # q and k side by side in one product: rotated together
                qk = _rotate(qkv[:, :, :qk_heads], cos, sin)
                q, k = qk[:, :, :H], qk[:, :, H:]
            else:
                q = _rotate(layer.q_norm(qkv[:, :, :H]), cos, sin)
                k = _rotate(layer.k_norm(qkv[:, :, H:qk_heads]), cos, sin)
            keys, values = cache_layer.write(k, qkv[:, :, qk_heads:], index)
            attended = attend_live(q.transpose(1, 2), keys, values, live, mask, layer.scaling)
            hidden = hidden + layer.o(attended.transpose(1, 2).reshape(B, T, -1), gating)
            x = layer.post_norm(hidden)
            gate_proj, up = layer.gate_up(x, gating).chunk(2, dim=-1)
            hidden = hidden + layer.down(layer.act(gate_proj) * up, gating)
        return self.final_norm(hidden)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding on the rotate-half layout, x [B, T, H, D], with sin's first half negated."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class _Unsupported(Exception):
    pass


def _is_stock(decoder, layer_classes) -> bool:
    module = type(decoder).__module__
    return all((module, type(decoder).__name__, cls.__name__) in _STOCK_CLASSES and cls.__module__ == module
               for cls in layer_classes)


def _has_hooks(decoder) -> bool:
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in decoder.modules())


def _norm(module) -> _Norm:
    """A stock family's RMSNorm (its own modeling file's class: x * rsqrt(mean(x^2) + eps) * weight)."""
    cls = type(module)
    if not (cls.__name__.endswith("RMSNorm") and any(cls.__module__ == stock[0] for stock in _STOCK_CLASSES)):
        raise _Unsupported
    return _Norm(module.weight, float(module.variance_epsilon))


def _read_layer(layer, dtype: torch.dtype) -> _Layer:
    attention, mlp = layer.self_attn, layer.mlp
    owners = {"q_proj": attention, "k_proj": attention, "v_proj": attention, "o_proj": attention,
              "gate_proj": mlp, "up_proj": mlp, "down_proj": mlp}
    projections = {name: _projection(getattr(owners[name], name, None), dtype) for name in _PROJECTIONS}
    norms = [_norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)]
    q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    head_norms = (None, None) if q_norm is None and k_norm is None else (_norm(q_norm), _norm(k_norm))
    qkv = _ProjectionGroup.of(projections["q_proj"], projections["k_proj"], projections["v_proj"])
    gate_up = _ProjectionGroup.of(projections["gate_proj"], projections["up_proj"])
    head_dim = attention.head_dim
    heads = [projections[name].weight.shape[0] // head_dim for name in ("q_proj", "k_proj")]
    return _Layer(norms[0], qkv, *head_norms, projections["o_proj"], norms[1], gate_up, projections["down_proj"],
                  mlp.act_fn, head_dim, *heads, float(attention.scaling))


def _projection(module, dtype: torch.dtype) -> _Projection:
    if isinstance(module, GatedLoRALinear):
        base, lora = module.base_layer, (module.lora_A.weight, module.lora_B.weight)
    elif type(module) is nn.Linear:
        base, lora = module, (None, None)
    else:
        raise _Unsupported
    if type(base) is not nn.Linear or any(t is not None and t.dtype != dtype for t in (base.weight, base.bias, *lora)):
        raise _Unsupported
    return _Projection(base.weight, base.bias, *lora, module.scaling if lora[0] is not None else 1.0)
