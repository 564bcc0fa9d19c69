"""Attention over the MTP training layout without an L x L score matrix.

In the training layout (`layout.training_layout`) every token is a pair (anchor a, mask number r): the
regular tokens are (a, 0) and the masks after an anchor a are (a, 1..k). Query (a, r) sees the regular
tokens (a', 0) with a' <= a and the masks (a, 1..r) of its own block, nothing else. Two facts make this
cheap to compute exactly:
- regular tokens see only earlier regular tokens: among themselves that is plain causal attention, which
  `F.scaled_dot_product_attention(is_causal=True)` runs with its fused kernels (no mask tensor, memory
  linear in the length where the backend allows);
- a mask block sees a prefix of the regular tokens plus its own k masks: one score matrix [m k, n] against
  the n regular keys and one [m, k, k] inside the m blocks, under one softmax.
So the scores cost n^2 / 2 + m k (n + k) per head instead of the dense L^2 with L = n + m k (m: the blocks,
one per anchor), which is what makes `--anchor-fraction` layouts and 512-token sequences fit in memory.

`TrainingGrid` records where each regular token and each block's masks sit in the layout; the outputs of
both parts are gathered back to layout order. Shapes: q [B, Hq, L, D], k and v [B, Hkv, L, D] (query head
h reads KV head h // (Hq / Hkv)) -> [B, Hq, L, D]. Long sequences on a GPU can instead use FlexAttention
(`attn_implementation="flex_attention"`, see `training.attention_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TrainingGrid:
    """Where the tokens of a batch's layout sit: n regular tokens and m mask blocks of k masks per row."""

    regular: torch.Tensor  # [B, n] layout index of regular token a (0 where the row has fewer)
    regular_present: torch.Tensor  # [B, n] bool
    blocks: torch.Tensor  # [B, m, k] layout index of mask r + 1 of block j (0 where there is none)
    block_anchor: torch.Tensor  # [B, m] the anchor a of block j (-1 where there is none)
    block_present: torch.Tensor  # [B, m, k] bool
    source: torch.Tensor  # [B, L] index of each layout token in [regular outputs; block outputs] (0: padding)

    @classmethod
    def from_layout(cls, anchor: torch.Tensor, mask_number: torch.Tensor, valid: torch.Tensor) -> TrainingGrid:
        """From the collator's [B, L] anchor, mask_number and valid (anchor -1 on padding)."""
        B, L = anchor.shape
        device = anchor.device
        is_regular = valid & (mask_number == 0)
        is_mask = valid & (mask_number > 0)
        block_of = torch.cumsum(is_mask & (mask_number == 1), dim=1) - 1  # a block starts at its mask 1
        n = int(is_regular.sum(1).max()) if B else 0
        m = int(block_of.max()) + 1 if bool(is_mask.any()) else 0
        k = int(mask_number.max()) if m else 0

        regular = torch.zeros(B, n, dtype=torch.long, device=device)
        regular_present = torch.zeros(B, n, dtype=torch.bool, device=device)
        rows, slots = is_regular.nonzero(as_tuple=True)
        regular[rows, anchor[rows, slots]] = slots
        regular_present[rows, anchor[rows, slots]] = True

        blocks = torch.zeros(B, m, k, dtype=torch.long, device=device)
        block_present = torch.zeros(B, m, k, dtype=torch.bool, device=device)
        block_anchor = torch.full((B, m), -1, dtype=torch.long, device=device)
        rows, slots = is_mask.nonzero(as_tuple=True)
        block, offset = block_of[rows, slots], mask_number[rows, slots] - 1
        blocks[rows, block, offset] = slots
        block_present[rows, block, offset] = True
        block_anchor[rows, block] = anchor[rows, slots]

        source = torch.where(is_regular, anchor.clamp(min=0), 0)
        source[rows, slots] = n + block * k + offset
        return cls(regular, regular_present, blocks, block_anchor, block_present, source)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D], index [B, N] -> x at those layout positions, [B, H, N, D]."""
    B, H, _, D = x.shape
    return x.gather(2, index[:, None, :, None].expand(B, H, index.shape[1], D))


def grid_attention(q, k, v, grid: TrainingGrid, scale: float | None = None, dropout: float = 0.0):
    """Masked attention of the training layout; see the module docstring."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    n = grid.regular.shape[1]
    m, width = grid.blocks.shape[1:]
    scale = D**-0.5 if scale is None else scale

    q_regular, k_regular, v_regular = (_take(x, grid.regular) for x in (q, k, v))
    # Rows with fewer regular tokens pad at the end, where causality keeps real queries from seeing them.
    out_regular = F.scaled_dot_product_attention(q_regular, k_regular, v_regular, is_causal=True, scale=scale,
                                                 dropout_p=dropout, enable_gqa=G > 1)
    if m == 0:
        return _take(out_regular, grid.source)

    blocks = grid.blocks.flatten(1)
    q_masks = _take(q, blocks).view(B, Hkv, G, m, width, D)
    k_blocks = _take(k, blocks).view(B, Hkv, 1, m, width, D)
    v_blocks = _take(v, blocks).view(B, Hkv, 1, m, width, D)
    prefix_scores = (q_masks.flatten(3, 4) @ k_regular[:, :, None].transpose(-1, -2)).view(B, Hkv, G, m, width, n)
    block_scores = q_masks @ k_blocks.transpose(-1, -2)  # [B, Hkv, G, m, k, k]
    # Softmax in fp32 at least (fp64 stays fp64), as the eager attention of transformers does.
    scores = torch.cat([prefix_scores, block_scores], dim=-1).to(torch.promote_types(q.dtype, torch.float32)) * scale

    sees_prefix = torch.arange(n, device=q.device) <= grid.block_anchor[..., None]  # [B, m, n]
    sees_prefix = sees_prefix & grid.regular_present[:, None, :]
    r = torch.arange(width, device=q.device)
    sees_block = (r[None, :] <= r[:, None]) & grid.block_present[:, :, None, :]  # [B, m, k, k]
    visible = torch.cat([sees_prefix[:, :, None, :].expand(B, m, width, n), sees_block], dim=-1)
    # Cells holding no mask see everything: finite scores, outputs never gathered back, zero gradient.
    visible = visible | ~grid.block_present[..., None]
    probs = torch.softmax(scores.masked_fill(~visible[:, None, None], float("-inf")), dim=-1).to(v.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    out_masks = (probs[..., :n].flatten(3, 4) @ v_regular[:, :, None]).view(B, Hkv, G, m, width, D)
    out_masks = out_masks + probs[..., n:] @ v_blocks
    out = torch.cat([out_regular, out_masks.reshape(B, Hq, m * width, D)], dim=2)
    return _take(out, grid.source)
