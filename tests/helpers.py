"""Small random models and prompts shared by the model-level tests."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import mtp_model

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
PAD, EOS, BOS = 0, 1, 2


def tiny_model(family="llama", seed=0, vocab_size=96, hidden_size=64, layers=2, heads=4, kv_heads=2, **overrides):
    config_class, model_class = FAMILIES[family]
    options = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads,
        max_position_embeddings=256,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
        tie_word_embeddings=False,
    )
    options.update(overrides)
    torch.manual_seed(seed)
    return model_class(config_class(**options)).eval()


def randomize_adapter(model, seed=0, std=0.1):
    """Non-zero LoRA B and a random sampler, so drafts are sometimes right and often wrong."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, mtp_model.GatedLoRALinear):
                module.lora_B.weight.normal_(0.0, std, generator=generator)
        for parameter in model.mtp.sampler.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def counting_examples(count, vocab_size, seed=0, length=14, prompt=4):
    """Training examples of a highly regular task (counting up from a random start), the first `prompt`
    tokens being the prompt."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        start = int(torch.randint(3, vocab_size, (1,), generator=generator))
        ids = 3 + (start + torch.arange(length)) % (vocab_size - 3)
        examples.append({"input_ids": ids, "loss_mask": torch.arange(length) >= prompt})
    return examples


def left_padded_prompts(lengths, vocab_size, seed=0, low=3):
    """[B, max(lengths)] ids and attention mask, each row's prompt right-aligned."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(low, vocab_size, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def stock_greedy(model, ids, mask, max_new_tokens, **kwargs):
    generate = type(model).generate  # stock generation even on a patched model
    return generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
