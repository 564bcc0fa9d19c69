"""The ops in plain torch: what runs wherever no kernel applies (CPU tensors outside `cpu_linear`'s packed
products, tree attention excepted, which runs SDPA there; GPUs Triton cannot drive; `MTP_KERNELS=torch`),
and the acceptance rules on every device (a few [B, k] ops, too small for a kernel to pay).

Each function has the name and signature of the public op in `mtp_kernels` without its checks: inputs are
assumed valid (the public functions validate them first). What each op computes is defined by the test
oracle, `tests/reference.py`, not by this module.

Shapes (B batch rows, T new tokens in a step, S cache slots, N rows, V vocabulary, d hidden size):

- gated_lora_linear: x [..., in], weight [out, in], bias [out] | None, lora_a [r, in], lora_b [out, r],
  gate [...] bool  ->  [..., out]; `add_masked_lora` adds the LoRA term to a base product already made,
  under the gate converted once by `lora_row_mask` (callers that run many linears under one gate)
- tree_attention_allowed: lengths [B], block_mask [T, T] bool, num_slots S, starts [B] | None  ->  [B, T, S]
  (the CPU path runs SDPA under this mask)
- choose_tokens: hidden [N, d], weight [V, d], noise [N, V] | None  ->  [N] int64
- accept_greedy: drafts [B, k], targets [B, k+1]  ->  (accepted [B], next_token [B])
- accept_sampling: logits [B, k+1, V], drafts [B, k], uniform [B, k], noise [B, k+1, V]
  ->  (accepted [B], next_token [B])
- kv_compact: caches list of [B, H, S, D], lengths [B], keep [B, K]  ->  None (in place)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# --- gated LoRA ----------------------------------------------------------------------------------------


def gated_lora_linear(x, weight, bias, lora_a, lora_b, scaling, gate):
    """`x W^T + b`, plus `scaling * (x A^T) B^T` on the rows whose gate is set.

    Rows with gate 0 are exactly `F.linear(x, weight, bias)`: their LoRA activations are zeroed before the
    B product, and adding exact zeros changes nothing. The LoRA term is computed in fp32 (fp64 for fp64
    inputs); a narrower output is lifted to fp32, the term added and the sum rounded once. Dense over all
    rows rather than gathering the gated ones: on CPU a gather and a scatter per linear cost more than the
    skipped rows' rank-r products (at most 2r / min(in, out) of the base product).
    Differentiable with respect to x, lora_a and lora_b.
    """
    return add_masked_lora(F.linear(x, weight, bias), x, lora_a, lora_b, scaling, lora_row_mask(gate, x.dtype))


def lora_row_mask(gate, dtype):
    """The gate [...] as the [M, 1] column of ones (gated rows) and zeros that `add_masked_lora` takes,
    in the dtype the LoRA term of `dtype` inputs is computed in."""
    return gate.reshape(-1, 1).to(torch.promote_types(dtype, torch.float32))


def add_masked_lora(out, x, lora_a, lora_b, scaling, row_mask):
    """`out + scaling * row_mask * (x A^T) B^T` for `out` = x's fresh base product [..., out_features]."""
    x2d = x.reshape(-1, x.shape[-1])
    if out.dtype == row_mask.dtype:
        # In place on the fresh output (its autograd node does not need it): no copy.
        lora_hidden = F.linear(x2d, lora_a) * row_mask
        out.view(-1, out.shape[-1]).addmm_(lora_hidden, lora_b.t(), alpha=scaling)
        return out
    wide = row_mask.dtype
    lora_hidden = F.linear(x2d.to(wide), lora_a.to(wide)) * row_mask
    summed = torch.addmm(out.reshape(-1, out.shape[-1]).to(wide), lora_hidden, lora_b.to(wide).t(), alpha=scaling)
    return summed.to(out.dtype).view_as(out)


# --- tree attention ------------------------------------------------------------------------------------


def tree_attention_allowed(lengths, block_mask, num_slots, starts=None):
    """Bool [B, T, S]: which cache slot each new query of each row may attend to.

    Row b's prefix is slots [0, lengths[b]), the new block is slots [lengths[b], lengths[b] + T) and is
    visible as `block_mask` says. Slots before starts[b] (left padding) are never visible, in the prefix
    or in the block.
    """
    T = block_mask.shape[0]
    slots = torch.arange(num_slots, device=lengths.device)
    relative = slots[None, :] - lengths[:, None].long()  # [B, S]: offset from the block start
    in_block = (relative >= 0) & (relative < T)
    block_visible = block_mask[:, relative.clamp(0, T - 1)].permute(1, 0, 2)  # [B, T, S]
    allowed = (relative < 0)[:, None, :] | (in_block[:, None, :] & block_visible)
    if starts is not None:
        allowed = allowed & (slots[None, :] >= starts[:, None].long())[:, None, :]
    return allowed


# --- sampler -------------------------------------------------------------------------------------------


def lm_head_logits(hidden, weight):
    """fp32 logits rounded to the hidden states' dtype, as `F.linear` in that dtype would return them (fp64
    logits for fp64 inputs)."""
    if hidden.dtype == torch.float64:
        return hidden @ weight.to(torch.float64).t()
    if hidden.dtype in (torch.float16, torch.bfloat16):
        # F.linear itself (fp32 accumulation, one rounding): an fp32 copy of the whole LM head per call
        # would cost more than the product.
        return F.linear(hidden, weight).float()
    return (hidden.float() @ weight.float().t()).to(hidden.dtype).float()


def filter_logits(logits, temperature, top_k=None, top_p=None):
    """Temperature, then top-k, then top-p (Hugging Face's order and tie rules); removed entries -> -inf."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return logits


def top_p_filter(logits, top_p):
    """Removes (-> -inf) the least likely tokens whose total probability is at most 1 - top_p."""
    # Stable, so tokens with equal logits fall in index order and the cut through a tie is well defined.
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False, stable=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def race(probs_or_logits_filtered, noise, exclude=None):
    """Exponential race: argmax_i p_i / E_i with E ~ Exp(1) samples a token with probability p_i.

    Takes filtered logits (so p_i is proportional to exp(logit_i)) and works in log space:
    argmax_i (logit_i - log E_i). `exclude` [N] removes one token per row first.
    """
    keys = probs_or_logits_filtered - noise.log()
    if exclude is not None:
        keys = keys.scatter(-1, exclude[:, None], float("-inf"))
    return keys.argmax(dim=-1)


def choose_tokens(hidden, weight, temperature=0.0, top_k=None, top_p=None, noise=None):
    """The token each row picks from `lm_head(hidden)`: argmax when temperature is 0 (ties go to the
    lowest index), else a sample via the exponential race with the given Exp(1) noise."""
    return choose_from_logits(lm_head_logits(hidden, weight), temperature, top_k, top_p, noise)


def choose_from_logits(logits, temperature=0.0, top_k=None, top_p=None, noise=None):
    """`choose_tokens` on fp32 logits [N, V] already computed."""
    if not temperature:
        return logits.argmax(dim=-1)
    return race(filter_logits(logits, temperature, top_k, top_p), noise)


def accept_greedy(drafts, targets):
    """Longest prefix of drafts equal to the verifier's tokens (a cumulative product, not a count).

    targets[:, j] is the verifier's token after the anchor and drafts[:, :j]; returns the accepted count a
    and the next token targets[:, a] (the bonus, always correct). A draft of -1 means "no draft" and is
    never accepted.
    """
    matches = ((drafts == targets[:, :-1]) & (drafts >= 0)).long()
    accepted = matches.cumprod(dim=1).sum(dim=1)
    next_token = targets.gather(1, accepted[:, None]).squeeze(1)
    return accepted, next_token


def accept_sampling(logits, drafts, uniform, noise, temperature, top_k=None, top_p=None):
    """Lossless speculative sampling with point-mass drafts.

    Draft j is accepted with probability p_j(d_j) (u_j < p_j(d_j)), stopping at the first rejection. On a
    rejection at j the next token is sampled from p_j with d_j removed and renormalised; after accepting
    all k drafts it is sampled from p_k. Whatever the drafts, the tokens produced follow p exactly. A
    draft of -1 means "no draft": it is never accepted and nothing is removed from p.
    """
    B, K1, V = logits.shape
    k = K1 - 1
    filtered = filter_logits(logits.float(), temperature, top_k, top_p)
    probs = filtered.softmax(dim=-1)
    p_draft = probs[:, :k].gather(2, drafts.clamp(min=0)[:, :, None]).squeeze(2) * (drafts >= 0)  # [B, k]
    accepted = (uniform < p_draft).long().cumprod(dim=1).sum(dim=1)
    rows = torch.arange(B, device=logits.device)
    position = accepted  # the distribution the next token comes from
    if k:
        exclude = torch.where(accepted < k, drafts.gather(1, accepted.clamp(max=k - 1)[:, None]).squeeze(1), -1)
    else:  # no drafts (a linear step after a rejection): the next token comes from p_0 as it is
        exclude = torch.full_like(accepted, -1)
    keys = filtered[rows, position] - noise[rows, position].log()
    has_exclusion = exclude >= 0
    keys[has_exclusion, exclude[has_exclusion]] = float("-inf")
    return accepted, keys.argmax(dim=-1)


# --- KV-cache compaction -------------------------------------------------------------------------------


def kv_compact(caches, lengths, keep):
    """Per row b, move the kept entries of this step's block to the slots right after the prefix.

    keep[b] lists indices into the block (strictly increasing, padded with -1 at the end); entry
    lengths[b] + keep[b, i] of every cache moves to slot lengths[b] + i. Then lengths[b] grows by the
    number kept. Caches and lengths are updated in place.
    """
    kept_counts = (keep >= 0).sum(dim=1)
    for b in range(keep.shape[0]):
        count = int(kept_counts[b])
        if count == 0:
            continue
        start = int(lengths[b])
        source = start + keep[b, :count].to(torch.long)
        for cache in caches:
            cache[b, :, start : start + count] = cache[b, :, source].clone()
    lengths += kept_counts.to(lengths.dtype)
