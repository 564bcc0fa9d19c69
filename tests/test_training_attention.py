"""grid_attention against the dense masked attention of the training layout: outputs and gradients."""

import pytest
import torch
import torch.nn.functional as F

from mtp_model.layout import training_attention_mask
from mtp_model.training import MTPDataCollator
from mtp_model.training_attention import TrainingGrid, grid_attention


def random_batch(num_masks, seed, lengths=(11, 4, 17), prompts=(3, 3, 16)):
    """Examples of different lengths, so rows pad; the last has a one-token response."""
    generator = torch.Generator().manual_seed(seed)
    examples = [{"input_ids": torch.randint(3, 50, (n,), generator=generator), "loss_mask": torch.arange(n) >= p}
                for n, p in zip(lengths, prompts)]
    return MTPDataCollator(num_masks, 50)(examples)


def dense_reference(q, k, v, batch, scale=None):
    """The dense [B, 1, L, L] rule through SDPA, in fp64, KV heads repeated for the query heads."""
    group = q.shape[1] // k.shape[1]
    allowed = training_attention_mask(batch["anchor"], batch["mask_number"], batch["valid"])
    return F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(group, 1),
                                          v.double().repeat_interleave(group, 1), attn_mask=allowed, scale=scale)


def qkv(batch, heads, kv_heads, dim, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    B, L = batch["input_ids"].shape
    return [torch.randn(B, h, L, dim, generator=generator).to(dtype).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("num_masks, heads, kv_heads, dim", [(1, 2, 2, 8), (3, 4, 2, 16), (8, 6, 1, 12)])
def test_outputs_and_gradients_equal_the_dense_rule(num_masks, heads, kv_heads, dim):
    batch = random_batch(num_masks, seed=num_masks)
    valid = batch["valid"]
    q, k, v = qkv(batch, heads, kv_heads, dim, torch.float64, seed=num_masks)
    grid = TrainingGrid.from_layout(batch["anchor"], batch["mask_number"], valid)
    ours = grid_attention(q, k, v, grid, scale=0.3)
    reference = dense_reference(q, k, v, batch, scale=0.3)
    # Padding tokens are nobody's key and carry no loss; their outputs differ by design.
    torch.testing.assert_close(ours.transpose(1, 2)[valid], reference.transpose(1, 2)[valid], rtol=1e-12, atol=1e-12)

    weights = torch.randn_like(ours) * valid[:, None, :, None]
    ours_grads = torch.autograd.grad((ours * weights).sum(), (q, k, v))
    reference_grads = torch.autograd.grad((reference * weights).sum(), (q, k, v))
    for name, got, want in zip("qkv", ours_grads, reference_grads):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_narrow_dtypes_stay_close_to_fp64(dtype):
    batch = random_batch(4, seed=11)
    valid = batch["valid"]
    q, k, v = qkv(batch, 4, 2, 16, dtype, seed=11)
    grid = TrainingGrid.from_layout(batch["anchor"], batch["mask_number"], valid)
    ours = grid_attention(q, k, v, grid)
    assert ours.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    reference = dense_reference(q, k, v, batch)
    torch.testing.assert_close(ours.transpose(1, 2)[valid].double(), reference.transpose(1, 2)[valid],
                               rtol=tolerance, atol=tolerance)


def test_a_batch_without_masks_is_plain_causal_attention():
    examples = [{"input_ids": torch.arange(3, 9), "loss_mask": torch.zeros(6, dtype=torch.bool)}]
    batch = MTPDataCollator(3, 50)(examples)
    assert int(batch["mask_number"].max()) == 0
    q, k, v = qkv(batch, 2, 2, 8, torch.float64, seed=3)
    grid = TrainingGrid.from_layout(batch["anchor"], batch["mask_number"], batch["valid"])
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(grid_attention(q, k, v, grid), expected, rtol=1e-12, atol=1e-12)


def test_grid_places_every_token_once():
    batch = random_batch(3, seed=5)
    grid = TrainingGrid.from_layout(batch["anchor"], batch["mask_number"], batch["valid"])
    n, (m, width) = grid.regular.shape[1], grid.blocks.shape[1:]
    for row in range(batch["input_ids"].shape[0]):
        for slot in batch["valid"][row].nonzero().flatten().tolist():
            a, r = int(batch["anchor"][row, slot]), int(batch["mask_number"][row, slot])
            source = int(grid.source[row, slot])
            if r == 0:
                assert source == a and int(grid.regular[row, a]) == slot and bool(grid.regular_present[row, a])
            else:
                block, offset = divmod(source - n, width)
                assert offset == r - 1 and int(grid.blocks[row, block, offset]) == slot
                assert int(grid.block_anchor[row, block]) == a and bool(grid.block_present[row, block, offset])
    assert int(grid.regular_present.sum()) + int(grid.block_present.sum()) == int(batch["valid"].sum())


@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_anchor_subsets_equal_the_dense_rule(fraction):
    torch.manual_seed(int(fraction * 10))
    generator = torch.Generator().manual_seed(1)
    examples = [{"input_ids": torch.randint(3, 50, (n,), generator=generator), "loss_mask": torch.arange(n) >= p}
                for n, p in [(23, 2), (9, 4), (30, 12)]]
    batch = MTPDataCollator(5, 50, anchor_fraction=fraction)(examples)
    valid = batch["valid"]
    q, k, v = qkv(batch, 6, 3, 8, torch.float64, seed=2)
    grid = TrainingGrid.from_layout(batch["anchor"], batch["mask_number"], valid)
    ours = grid_attention(q, k, v, grid)
    reference = dense_reference(q, k, v, batch)
    torch.testing.assert_close(ours.transpose(1, 2)[valid], reference.transpose(1, 2)[valid], rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(ours) * valid[:, None, :, None]
    for got, want in zip(torch.autograd.grad((ours * weights).sum(), (q, k, v)),
                         torch.autograd.grad((reference * weights).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
