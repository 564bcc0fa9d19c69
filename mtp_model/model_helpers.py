"""What patch, decoding, training and the adapter format share about a (patched) model: the supported families,
whether a model is patched, the facts an adapter must match, the sliding window, the length past which the
rotary embedding changes, and the mask-token inputs and gate of a forward. A leaf module: it imports nothing
of the package, so nothing here forms an import cycle.

Mask tokens live outside the model's vocabulary: in the id tensors this package builds, mask i is
`vocab_size + i`. `embed_tokens` embeds such ids; the gate of a forward is `ids >= vocab_size`.
"""

from __future__ import annotations

import contextlib

import torch

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def is_patched(model) -> bool:
    """Whether `mtp_model.patch` has patched `model` (and `unpatch` has not undone it)."""
    return hasattr(model, "mtp_config")


def describe_model(model) -> dict:
    """The facts an adapter must agree with to fit a model."""
    config = model.config
    return {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "name_or_path": getattr(config, "_name_or_path", "") or "",
    }


def sliding_window(model) -> int | None:
    """The narrowest sliding attention window among the model's layers, None if every layer sees the whole
    sequence. Qwen2 and Qwen3 attention modules carry their layer's window (None on full-attention layers);
    Mistral's read the config's."""
    windows = []
    for layer in model.model.layers:
        attention = layer.self_attn
        window = attention.sliding_window if hasattr(attention, "sliding_window") else getattr(
            model.config, "sliding_window", None)
        if window:
            windows.append(int(window))
    return min(windows, default=None)


def rope_length_limit(model) -> int | None:
    """The sequence length from which the model's rotary embedding changes its frequencies, None where they
    are fixed. "dynamic" scaling recomputes them from each forward's furthest position, "longrope" switches
    to its long factors past the original context: both read the positions a forward is given, and MTP's
    forwards reach past the sequence (mask tokens), so past this limit they would rotate differently."""
    rotary = getattr(model.model, "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", "default")
    rope_types = list(rope_type.values()) if isinstance(rope_type, dict) else [rope_type]
    if not any("dynamic" in name or name == "longrope" for name in rope_types):
        return None
    parameters = getattr(model.config, "rope_parameters", None) or {}
    limits = [parameters.get("original_max_position_embeddings"), getattr(rotary, "original_max_seq_len", None),
              getattr(model.config, "max_position_embeddings", None)]
    return min(int(limit) for limit in limits if limit is not None)


def mask_token_ids(model, num_masks: int | None = None) -> list[int]:
    count = model.mtp_config.num_masks if num_masks is None else num_masks
    return [model.config.vocab_size + i for i in range(count)]


def embed_tokens(model, ids: torch.Tensor) -> torch.Tensor:
    """[B, S] ids (mask i = vocab_size + i) -> [B, S, d] input embeddings."""
    vocab_size = model.config.vocab_size
    is_mask = ids >= vocab_size
    regular = model.get_input_embeddings()(ids.masked_fill(is_mask, 0))
    masks = model.mtp.mask_embeddings[(ids - vocab_size).clamp(0, model.mtp.num_masks - 1)]
    return torch.where(is_mask[..., None], masks.to(regular.dtype), regular)


@contextlib.contextmanager
def gate_context(model, gate: torch.Tensor | None):
    """Sets the gated-LoRA gate ([B, S] bool, True on mask tokens) for the forwards inside the block."""
    model.mtp_gate.set(gate)
    try:
        yield
    finally:
        model.mtp_gate.set(None)
