"""Training attention over the MTP layout, forward and backward: grid_attention against SDPA with the rule
as a dense [B, 1, L, L] mask (what the training step ran before) and FlexAttention's BlockMask on a GPU.

Shapes: Llama-3-8B attention (32 query heads, 8 KV heads, D=128), batch 4, k=8 masks after each of the
last 192 of 256 tokens (L = 1984) on a GPU; a tiny layout on CPU.
"""

import pytest
import torch
import torch.nn.functional as F
from common import DEVICE, DTYPE, ON_GPU, grid, run

from mtp_model.layout import training_attention_mask
from mtp_model.training import MTPDataCollator, flex_block_mask
from mtp_model.training_attention import TrainingGrid, grid_attention

HEADS, KV_HEADS, HEAD_DIM = grid((32, 8, 128), (4, 2, 16))
BATCH, LENGTH, PROMPT, K = grid((4, 256, 64, 8), (2, 24, 8, 3))


def layout_and_inputs():
    generator = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(0, 1000, (LENGTH,), generator=generator),
                 "loss_mask": torch.arange(LENGTH) >= PROMPT} for _ in range(BATCH)]
    batch = {name: t.to(DEVICE) for name, t in MTPDataCollator(K, 1000)(examples).items()}
    L = batch["input_ids"].shape[1]
    q = torch.randn(BATCH, HEADS, L, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
    k = torch.randn(BATCH, KV_HEADS, L, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
    v = torch.randn(BATCH, KV_HEADS, L, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
    return batch, q, k, v


def forward_backward(attend, q, k, v):
    def step():
        out = attend(q, k, v)
        out.backward(torch.ones_like(out))
    return step


def record(benchmark, batch):
    benchmark.extra_info["layout_tokens"] = int(batch["valid"].sum())


def test_grid_attention(benchmark):
    batch, q, k, v = layout_and_inputs()
    training_grid = TrainingGrid.from_layout(batch["anchor"], batch["mask_number"], batch["valid"])
    benchmark.group = "training attention"
    run(benchmark, forward_backward(lambda q, k, v: grid_attention(q, k, v, training_grid), q, k, v))
    record(benchmark, batch)


def test_sdpa_dense_mask(benchmark):
    batch, q, k, v = layout_and_inputs()
    allowed = training_attention_mask(batch["anchor"], batch["mask_number"], batch["valid"])

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)

    benchmark.group = "training attention"
    run(benchmark, forward_backward(attend, q, k, v))
    record(benchmark, batch)


@pytest.mark.skipif(not ON_GPU, reason="FlexAttention has no backward on CPU")
def test_flex_attention_block_mask(benchmark):
    from torch.nn.attention.flex_attention import flex_attention

    batch, q, k, v = layout_and_inputs()
    block_mask = flex_block_mask(batch["anchor"], batch["mask_number"], batch["valid"])
    compiled = torch.compile(flex_attention)
    benchmark.group = "training attention"
    run(benchmark, forward_backward(lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=True), q, k, v))
    record(benchmark, batch)
