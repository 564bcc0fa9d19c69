"""`patch(model)` turns a stock Llama / Qwen2 / Qwen3 / Mistral causal LM into an MTP model, in place.

It adds `model.mtp` (mask embeddings and sampler head), `model.mtp_config`, `model.mtp_gate` (the per-forward
gate shared by every gated linear), wraps the target projections of every decoder layer in `GatedLoRALinear`,
switches attention to the MTP-aware implementation and replaces `generate` with MTP decoding, `forward` with
one that also computes the MTP training loss (`forward(mtp_batch=...)`, see `training.mtp_forward`) and
`save_pretrained` with one that saves the base model in its stock layout and the adapter beside it
(`adapter.save_pretrained`). The base model's weights are untouched and frozen; `unpatch(model)` restores it
exactly.
The helpers that decoding and training share with it (mask-token inputs, the gate, the sliding window)
live in the leaf module `model_helpers`.
"""

from __future__ import annotations

import inspect
import types
from inspect import Parameter
from pathlib import Path

import torch
from torch import nn

from mtp_model import adapter as adapter_io
from mtp_model.attention import use_mtp_attention
from mtp_model.config import MTPConfig
from mtp_model.model_helpers import SUPPORTED_FAMILIES, describe_model, is_patched
from mtp_model.modules import GateContext, GatedLoRALinear, MTPHead

def _check_patchable(model) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"mtp_model.patch supports {', '.join(SUPPORTED_FAMILIES)} causal LMs; got {type(model).__name__} "
            f"(model_type={model_type!r})"
        )
    if not (hasattr(model, "model") and hasattr(model.model, "layers") and hasattr(model, "lm_head")):
        raise ValueError(f"{type(model).__name__} is a {model_type} model without an LM head; pass the *ForCausalLM model")
    if is_patched(model):
        raise ValueError("this model is already patched; call mtp_model.unpatch(model) first")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("the model has weights on the meta device; load or materialise them before patching")
    if model.lm_head.bias is not None:
        raise ValueError("an LM head with a bias is not supported")


def patch(model, config: MTPConfig | None = None, adapter: str | Path | None = None):
    """Adds MTP to `model` in place and returns it. `adapter` loads a saved adapter (its config wins)."""
    _check_patchable(model)
    if adapter is not None:
        saved = adapter_io.load_config(adapter)
        if config is not None and config.to_dict() | {"base_model": {}} != saved.to_dict() | {"base_model": {}}:
            raise ValueError("pass either config= or adapter= (the adapter carries its own config), not both")
        adapter_io.check_fits(saved, model)
        config = saved
    config = MTPConfig.from_dict((config or MTPConfig()).to_dict())
    config.base_model = describe_model(model)

    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    weight = model.lm_head.weight
    gate = GateContext()
    originals = {}
    for layer_index, layer in enumerate(model.model.layers):
        for name, module in list(layer.named_modules()):
            if name.rsplit(".", 1)[-1] in config.target_modules and isinstance(module, nn.Linear):
                parent_name, _, child = name.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                originals[f"model.layers.{layer_index}.{name}"] = module
                setattr(parent, child, GatedLoRALinear(module, config.lora_rank, config.lora_alpha, gate))
    if not originals:
        raise ValueError(f"no decoder projection matched target_modules {config.target_modules}")

    init_std = config.mask_init_std or _finite_std(model.get_input_embeddings().weight)
    if config.draft_vocab_size is not None and config.draft_vocab_size > model.config.vocab_size:
        raise ValueError(f"draft_vocab_size={config.draft_vocab_size} exceeds the model's vocabulary of "
                         f"{model.config.vocab_size}")
    model.mtp = MTPHead(config.num_masks, model.config.hidden_size, init_std, config.draft_vocab_size,
                        config.sampler_residual, device=weight.device, dtype=weight.dtype)
    model.requires_grad_(False)  # only the LoRA factors and the sampler train
    for module in model.modules():
        if isinstance(module, GatedLoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
    model.mtp.sampler.requires_grad_(True)

    model.mtp_config = config
    model.mtp_gate = gate
    model.mtp_stats = None
    model._mtp_original_modules = originals
    model._mtp_original_requires_grad = trainable
    model._mtp_original_attention = use_mtp_attention(model)

    from mtp_model.decoding import mtp_generate  # both import this module
    from mtp_model.training import mtp_forward

    model.generate = types.MethodType(mtp_generate, model)
    model.save_pretrained = types.MethodType(adapter_io.save_pretrained, model)
    model.forward = types.MethodType(_under_stock_signature(mtp_forward, type(model).forward), model)
    try:
        if adapter is not None:
            adapter_io.load_weights(model, adapter)
        else:
            adapter_io.check_finite(adapter_io.adapter_tensors(model), "the new MTP adapter")
    except ValueError:
        unpatch(model)  # a refused adapter leaves the model as it was
        raise
    return model


def _under_stock_signature(function, stock_forward):
    """`function(model, ...)` presented with stock forward's signature plus its own keyword-only options:
    stock generate (through `inspect.signature(model.forward)`) infers an attention mask from padding and
    builds position ids only for a forward that names them, and the HF Trainer keeps the dataset columns
    that the signature names."""
    def forward(model, *args, **kwargs):
        return function(model, *args, **kwargs)

    stock = list(inspect.signature(stock_forward).parameters.values())
    own = [p for p in inspect.signature(function).parameters.values() if p.kind is Parameter.KEYWORD_ONLY]
    var_keyword = [p for p in stock if p.kind is Parameter.VAR_KEYWORD]
    named = [p for p in stock if p.kind is not Parameter.VAR_KEYWORD]
    forward.__signature__ = inspect.Signature(named + own + var_keyword)
    forward.__doc__ = function.__doc__
    return forward


def _finite_std(weight: torch.Tensor) -> float:
    """The std of the finite entries of `weight` (an unused embedding row may hold NaN), the mask
    embeddings' scale by default."""
    values = weight.detach().float()
    values = values[torch.isfinite(values)]
    if values.numel() < 2:
        raise ValueError("the input embeddings hold no finite values to scale the mask embeddings by; "
                         "set MTPConfig(mask_init_std=...)")
    return float(values.std())


def unpatch(model):
    """Restores the model `patch` changed: original linears, attention implementation, generate, forward."""
    if not is_patched(model):
        raise ValueError("this model is not patched")
    for path, original in model._mtp_original_modules.items():
        parent_name, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_name), child, original)
    model.set_attn_implementation(model._mtp_original_attention)
    del model.mtp
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(model._mtp_original_requires_grad[name])
    for name in ("mtp_config", "mtp_gate", "mtp_stats", "_mtp_original_modules", "_mtp_original_attention",
                 "_mtp_original_requires_grad", "generate", "forward", "save_pretrained"):  # the class's methods show through again
        delattr(model, name)
    if hasattr(model, "_mtp_checkpoint_functions"):  # set by training.enable_gradient_checkpointing
        # Its checkpoints restore the gate of a patched model: the stock model must not keep them.
        if hasattr(model, "activation_checkpointing_disable"):  # the name in newer transformers
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        del model._mtp_checkpoint_functions
    model.__dict__.pop("mtp_compiled_step", None)  # set by compile_step
    return model
