"""Token layouts of MTP forwards: which token goes where, at which position, seeing what.

Decoding. A step feeds the anchor (the last verified token, not yet cached) followed by n drafts, and k
mask tokens after some of them. Regular token g (anchor g = 0, draft g >= 1) sits at position P + g; mask i
(1..k) after regular token g sits at P + g + i. Regular token g sees the cached prefix and regular tokens
0..g; mask (g, i) sees the prefix, regular tokens 0..g and masks (g, 1..i) of its own block; nothing else.
- quadratic: a mask block after every regular token, interleaved [r0, m1..mk, r1, m1..mk, ...]:
  (n+1)(k+1) tokens, so whichever draft is the last accepted, fresh drafts exist after it.
- linear: [r0..rn, m1..mk], one block after the last draft (the paper's ablation).
Without drafts (n = 0) both are [anchor, m1..mk].
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepLayout:
    """One decoding step's layout; every tensor is [T] unless said otherwise (T tokens in the block)."""

    regular: torch.Tensor  # [n+1] block index of regular token g
    masks: torch.Tensor  # [n+1, k] block index of mask i after regular g, -1 where g has no block
    anchor_of: torch.Tensor  # regular index g that each token belongs to
    mask_number: torch.Tensor  # 0 for regular tokens, i for mask i
    position_offset: torch.Tensor  # position relative to the anchor's, g + i
    block_mask: torch.Tensor  # [T, T] bool, True = may attend

    @property
    def size(self) -> int:
        return self.anchor_of.shape[0]


@functools.lru_cache(maxsize=64)
def step_layout(num_drafts: int, num_masks: int, mode: str, device: torch.device) -> StepLayout:
    if mode not in ("quadratic", "linear"):
        raise ValueError(f"decoding mode must be 'quadratic' or 'linear', got {mode!r}")
    with_masks = range(num_drafts + 1) if mode == "quadratic" else [num_drafts]
    tokens = []  # (anchor g, mask number i)
    if mode == "quadratic":
        for g in range(num_drafts + 1):
            tokens += [(g, i) for i in range(num_masks + 1)]
    else:
        tokens = [(g, 0) for g in range(num_drafts + 1)] + [(num_drafts, i) for i in range(1, num_masks + 1)]

    anchor_of = torch.tensor([g for g, _ in tokens])
    mask_number = torch.tensor([i for _, i in tokens])
    query_anchor, key_anchor = anchor_of[:, None], anchor_of[None, :]
    query_mask, key_mask = mask_number[:, None], mask_number[None, :]
    sees_regular = (key_mask == 0) & (key_anchor <= query_anchor)
    sees_own_block = (key_anchor == query_anchor) & (key_mask > 0) & (key_mask <= query_mask)
    block_mask = sees_regular | (sees_own_block & (query_mask > 0))

    index = {token: position for position, token in enumerate(tokens)}
    regular = torch.tensor([index[(g, 0)] for g in range(num_drafts + 1)])
    masks = torch.full((num_drafts + 1, num_masks), -1)
    for g in with_masks:
        masks[g] = torch.tensor([index[(g, i)] for i in range(1, num_masks + 1)])
    return StepLayout(
        regular=regular.to(device),
        masks=masks.to(device),
        anchor_of=anchor_of.to(device),
        mask_number=mask_number.to(device),
        position_offset=(anchor_of + mask_number).to(device),
        block_mask=block_mask.to(device),
    )
