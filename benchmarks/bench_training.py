"""Training throughput (layout tokens per second) of an MTP step against the same step with peft's ungated LoRA.

Both run the same MTP training layout (k masks after every response token) under the same attention rule:
ours through `grid_attention` (the default), peft's model through SDPA with the rule as a dense mask. Ours
gates LoRA to the mask tokens and adds the sampler and consistency losses, peft applies LoRA to every token
and only the LM-head loss. On a GPU: a 2-layer Llama-3-8B-shaped model in bf16, batch 4 x 256
tokens before masks, k=8; on CPU a tiny model.
"""

import pytest
import torch
import torch.nn.functional as F
from common import DEVICE, DTYPE, ON_GPU, run
from transformers import LlamaConfig, LlamaForCausalLM

import mtp_model
from mtp_model.model_helpers import embed_tokens
from mtp_model.layout import training_attention_mask
from mtp_model.training import IGNORE_INDEX, MTPDataCollator, mtp_loss

K = 8 if ON_GPU else 3
RANK = 16
BATCH, LENGTH, PROMPT = (4, 256, 64) if ON_GPU else (2, 24, 8)


def config():
    if ON_GPU:
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256)
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256)


def batch_for(vocab_size):
    generator = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(0, vocab_size, (LENGTH,), generator=generator),
                 "loss_mask": torch.arange(LENGTH) >= PROMPT} for _ in range(BATCH)]
    batch = MTPDataCollator(K, vocab_size)(examples)
    return {name: tensor.to(DEVICE) for name, tensor in batch.items()}


def record(benchmark, batch):
    if benchmark.stats:
        benchmark.extra_info["layout_tokens_per_second"] = int(batch["valid"].sum()) / benchmark.stats.stats.min


def test_mtp_training_step(benchmark):
    torch.manual_seed(0)
    model = LlamaForCausalLM(config()).to(DEVICE, DTYPE)
    mtp_model.patch(model, mtp_model.MTPConfig(num_masks=K, lora_rank=RANK))
    batch = batch_for(model.config.vocab_size)

    def step():
        loss, _ = mtp_loss(model, batch)
        loss.backward()

    benchmark.group = "training step"
    run(benchmark, step)
    record(benchmark, batch)


def test_peft_ungated_lora_step(benchmark):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(config()).to(DEVICE, DTYPE)
    mtp_model.patch(model, mtp_model.MTPConfig(num_masks=K, lora_rank=RANK))
    batch = batch_for(model.config.vocab_size)
    with torch.no_grad():  # the same inputs, mask embeddings included
        embeds = embed_tokens(model, batch["input_ids"])
        # The unpatched model gets the layout's rule as a dense mask (its attention has no grid path).
        attention_mask = training_attention_mask(batch["anchor"], batch["mask_number"], batch["valid"])
    mtp_model.unpatch(model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets))
    labels = batch["labels"]

    def step():
        hidden = peft_model.base_model.model.model(inputs_embeds=embeds, position_ids=batch["position_ids"],
                                                    attention_mask=attention_mask).last_hidden_state
        rows = labels != IGNORE_INDEX
        loss = F.cross_entropy(peft_model.base_model.model.lm_head(hidden[rows]).float(), labels[rows])
        loss.backward()

    benchmark.group = "training step"
    run(benchmark, step)
    record(benchmark, batch)
