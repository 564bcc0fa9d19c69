"""Token layouts of MTP forwards: which token goes where, at which position, seeing what.

Both layouts share one attention rule over (anchor, mask number) pairs; see the decoding and training
sections below.

Decoding. A step feeds the anchor (the last verified token, not yet cached) followed by n drafts, and k
mask tokens after some of them. Regular token g (anchor g = 0, draft g >= 1) sits at position P + g; mask i
(1..k) after regular token g sits at P + g + i. Regular token g sees the cached prefix and regular tokens
0..g; mask (g, i) sees the prefix, regular tokens 0..g and masks (g, 1..i) of its own block; nothing else.
- quadratic: a mask block after every regular token, [r0..rn, (m1..mk after r0), ..., (m1..mk after rn)]:
  (n+1)(k+1) tokens, so whichever draft is the last accepted, fresh drafts exist after it.
- linear: [r0..rn, m1..mk], one block after the last draft (the paper's ablation).
Without drafts (n = 0) both are [anchor, m1..mk]. The order of the block's tokens is free (positions and the
block mask say who is where); regular tokens come first, then the mask blocks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


def may_attend(query_anchor, query_mask, key_anchor, key_mask):
    """The attention rule of both layouts, elementwise on broadcastable tensors: query (anchor a1, mask
    number r1) may attend to key (a2, r2) iff (r2 == 0 and a2 <= a1) or (a2 == a1 and 0 < r2 <= r1).
    Decoding's block masks, training's dense mask and its FlexAttention mask are this function;
    `training_attention.grid_attention` computes it part by part and is tested against it."""
    sees_regular = (key_mask == 0) & (key_anchor <= query_anchor)
    sees_own_block = (key_anchor == query_anchor) & (key_mask > 0) & (key_mask <= query_mask)
    return sees_regular | sees_own_block


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
    # (anchor g, mask number i), regular tokens first, then each mask block in anchor order.
    tokens = [(g, 0) for g in range(num_drafts + 1)]
    tokens += [(g, i) for g in with_masks for i in range(1, num_masks + 1)]

    anchor_of = torch.tensor([g for g, _ in tokens])
    mask_number = torch.tensor([i for _, i in tokens])
    block_mask = may_attend(anchor_of[:, None], mask_number[:, None], anchor_of[None, :], mask_number[None, :])

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


# --- training ----------------------------------------------------------------------------------------
#
# Training. k masks follow every loss-bearing token of a sequence x_0..x_{n-1} (token i is loss-bearing when
# its label x_{i+1} is a response token), or a chosen subset of them (`anchors`); none follow prompt tokens.
# Every token carries (anchor a, mask number r): a regular token x_i is (i, 0), mask j after x_i is (i, j).
# The attention rule is the decoding one (`may_attend`), so one forward simulates, for every response
# position, "the first i tokens + k masks".


@dataclass(frozen=True)
class TrainingLayout:
    """One training sequence of L tokens; every tensor is [L]."""

    input_ids: torch.Tensor  # regular ids, mask j = vocab_size + j - 1
    position_ids: torch.Tensor  # a + r
    anchor: torch.Tensor  # a: index in the original sequence of the regular token the token follows
    mask_number: torch.Tensor  # r: 0 for regular tokens, j for mask j
    labels: torch.Tensor  # x_{a+r+1}, or -100 where there is none or it is a prompt token
    previous_ids: torch.Tensor  # the sampler's teacher-forced previous token x_{a+r}
    consistency_target: torch.Tensor  # for masks: layout index of regular x_{a+r} (-1: none); -1 for regulars


def training_layout(input_ids: torch.Tensor, loss_mask: torch.Tensor, num_masks: int, vocab_size: int,
                    ignore_index: int = -100, anchors: torch.Tensor | None = None) -> TrainingLayout:
    """Lays out one sequence (ids [n], loss_mask [n] bool, True on response tokens) for MTP training.
    `anchors` ([n] bool) limits the mask blocks to the loss-bearing tokens it marks (default: all)."""
    if input_ids.ndim != 1 or loss_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and loss_mask must be [n] each; got {tuple(input_ids.shape)} and "
                         f"{tuple(loss_mask.shape)}")
    if anchors is not None and anchors.shape != input_ids.shape:
        raise ValueError(f"anchors must be [n] like input_ids, got {tuple(anchors.shape)}")
    n = input_ids.shape[0]
    ids = input_ids.tolist()
    response = loss_mask.bool().tolist()
    chosen = [True] * n if anchors is None else anchors.bool().tolist()
    tokens = []  # (anchor a, mask number r)
    for i in range(n):
        tokens.append((i, 0))
        if i + 1 < n and response[i + 1] and chosen[i]:
            tokens += [(i, j) for j in range(1, num_masks + 1)]
    regular_slot = {a: slot for slot, (a, r) in enumerate(tokens) if r == 0}

    def label(target):
        return ids[target] if target < n and response[target] else ignore_index

    return TrainingLayout(
        input_ids=torch.tensor([ids[a] if r == 0 else vocab_size + r - 1 for a, r in tokens]),
        position_ids=torch.tensor([a + r for a, r in tokens]),
        anchor=torch.tensor([a for a, _ in tokens]),
        mask_number=torch.tensor([r for _, r in tokens]),
        labels=torch.tensor([label(a + r + 1) for a, r in tokens]),
        previous_ids=torch.tensor([ids[a + r] if a + r < n else ids[-1] for a, r in tokens]),
        consistency_target=torch.tensor([regular_slot.get(a + r, -1) if r > 0 else -1 for a, r in tokens]),
    )


def training_attention_mask(anchor: torch.Tensor, mask_number: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, L] (anchor, mask number, valid) -> [B, 1, L, L] bool, True = may attend (padding sees nothing
    and is seen by nothing, except itself so no softmax row is empty)."""
    allowed = may_attend(anchor[:, :, None], mask_number[:, :, None], anchor[:, None, :], mask_number[:, None, :])
    allowed &= valid[:, None, :] & valid[:, :, None]
    allowed |= torch.eye(anchor.shape[1], dtype=torch.bool, device=anchor.device)[None]
    return allowed[:, None]
