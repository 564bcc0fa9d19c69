"""The test oracle: what each `mtp_kernels` op computes, written from its definition in float64, for the
tests to hold every implementation to (the Triton kernels, `mtp_kernels.torch_ops`, the CPU's packed and
SDPA paths, the extension).

Each function takes the public op's arguments (sampling parameters spelled out) and computes in float64;
values come back rounded once to the inputs' dtype (fp64 inputs: the exact answer; narrower ones: the
correctly rounded one), choices as token ids. The formulations differ on purpose from `torch_ops` (per-row loops, masks built by
concatenation, top-p by pairwise mass), so that a test of `torch_ops` against this module can fail.
Written for clarity, not speed: test-sized inputs only. Shapes are those of the public ops
(`mtp_kernels/torch_ops.py` lists them).
"""

from __future__ import annotations

import torch

_F64 = torch.float64


def gated_lora_linear(x, weight, bias, lora_a, lora_b, scaling, gate):
    """`x W^T + b + scaling * g (x A^T) B^T`, with g = 1 on gated rows and 0 elsewhere. Differentiable."""
    x64 = x.to(_F64)
    base = x64 @ weight.to(_F64).t()
    if bias is not None:
        base = base + bias.to(_F64)
    lora = (x64 @ lora_a.to(_F64).t()) @ lora_b.to(_F64).t()
    return (base + scaling * gate.to(_F64)[..., None] * lora).to(x.dtype)


def tree_attention_allowed(lengths, block_mask, num_slots, starts=None):
    """Bool [B, T, S]: row b's queries see its prefix [starts[b], lengths[b]), then the new block as
    `block_mask` says, then nothing."""
    T = block_mask.shape[0]
    rows = []
    for b in range(lengths.shape[0]):
        prefix = int(lengths[b])
        row = torch.cat([
            torch.ones(T, prefix, dtype=torch.bool, device=block_mask.device),
            block_mask.bool(),
            torch.zeros(T, max(num_slots - prefix - T, 0), dtype=torch.bool, device=block_mask.device),
        ], dim=1)[:, :num_slots]
        if starts is not None:
            row[:, : int(starts[b])] = False
        rows.append(row)
    return torch.stack(rows)


def tree_attention(q, k, v, lengths, block_mask, scale=None, starts=None):
    """softmax(q k^T * scale) v over the slots `tree_attention_allowed` permits, query head h reading KV
    head h // (Hq / Hkv); a query that sees nothing gets zeros."""
    B, Hq, T, D = q.shape
    group = Hq // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    allowed = tree_attention_allowed(lengths, block_mask, k.shape[2], starts)
    out = torch.zeros(B, Hq, T, D, dtype=_F64, device=q.device)
    for b in range(B):
        for h in range(Hq):
            keys, values = k[b, h // group].to(_F64), v[b, h // group].to(_F64)
            for t in range(T):
                visible = allowed[b, t].nonzero().squeeze(1)
                if visible.numel():
                    weights = torch.softmax(keys[visible] @ q[b, h, t].to(_F64) * scale, dim=0)
                    out[b, h, t] = weights @ values[visible]
    return out.to(q.dtype)


def head_logits(hidden, weight):
    """The LM head's logits as the model's dtype holds them (the exact product rounded once), in fp64."""
    return (hidden.to(_F64) @ weight.to(_F64).t()).to(hidden.dtype).to(_F64)


def filter_logits(row_logits, temperature, top_k=None, top_p=None):
    """One row [V]: divided by the temperature; then top-k keeps every token at least as likely as the
    k-th most likely; then top-p keeps a token when the tokens ranked above it (higher logit, or an equal
    logit at a higher index: Hugging Face's ascending stable sort) hold less than top_p of the
    probability. Removed tokens -> -inf."""
    row = row_logits.to(_F64) / temperature
    if top_k is not None and top_k < row.numel():
        row = row.masked_fill(row < row.sort(descending=True).values[top_k - 1], float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(row, dim=0)
        index = torch.arange(row.numel(), device=row.device)
        above = (row[None, :] > row[:, None]) | ((row[None, :] == row[:, None]) & (index[None, :] > index[:, None]))
        mass_above = (above * probs[None, :]).sum(dim=1)
        row = row.masked_fill(mass_above >= top_p, float("-inf"))
    return row


def _first_max(values):
    """The lowest index holding the largest value."""
    return int((values == values.max()).nonzero()[0])


def choose_tokens(hidden, weight, temperature=0.0, top_k=None, top_p=None, noise=None):
    """Per row: greedy, the first token of highest logit; sampling, the exponential race over the filtered
    distribution, argmax_i(filtered_i - log E_i) with noise E ~ Exp(1) (a sample of softmax(filtered))."""
    rows = head_logits(hidden, weight)
    chosen = []
    for n in range(rows.shape[0]):
        if not temperature:
            chosen.append(_first_max(rows[n]))
        else:
            chosen.append(_first_max(filter_logits(rows[n], temperature, top_k, top_p) - noise[n].to(_F64).log()))
    return torch.tensor(chosen, dtype=torch.long, device=hidden.device)


def accept_greedy(drafts, targets):
    """Per row: a = the number of leading drafts (a draft of -1: none) equal to the verifier's tokens; next
    token targets[a]."""
    accepted, next_tokens = [], []
    for b in range(drafts.shape[0]):
        a = 0
        while a < drafts.shape[1] and int(drafts[b, a]) >= 0 and int(drafts[b, a]) == int(targets[b, a]):
            a += 1
        accepted.append(a)
        next_tokens.append(int(targets[b, a]))
    device = drafts.device
    return torch.tensor(accepted, device=device), torch.tensor(next_tokens, dtype=targets.dtype, device=device)


def accept_sampling(logits, drafts, uniform, noise, temperature, top_k=None, top_p=None):
    """Per row, speculative sampling with point-mass drafts: draft j (not -1) is accepted while
    uniform[j] < p_j(draft j), p_j the filtered softmax of logits[j]; the next token is a race over
    p_a, the accepted count's distribution, without the rejected draft (if one was rejected)."""
    B, K1, _ = logits.shape
    accepted, next_tokens = [], []
    for b in range(B):
        filtered = [filter_logits(logits[b, j], temperature, top_k, top_p) for j in range(K1)]
        a = 0
        while a < K1 - 1 and int(drafts[b, a]) >= 0 and \
                float(uniform[b, a]) < float(torch.softmax(filtered[a], dim=0)[int(drafts[b, a])]):
            a += 1
        keys = filtered[a] - noise[b, a].to(_F64).log()
        if a < K1 - 1 and int(drafts[b, a]) >= 0:
            keys[int(drafts[b, a])] = float("-inf")
        accepted.append(a)
        next_tokens.append(_first_max(keys))
    return torch.tensor(accepted, device=logits.device), torch.tensor(next_tokens, device=logits.device)


def linear_cross_entropy(hidden, weight, labels, row_weights=None, ignore_index=-100):
    """sum_n w_n * -log softmax(h_n W^T)[label_n] / sum_n w_n over rows whose label is not `ignore_index`."""
    log_probs = torch.log_softmax(hidden.to(_F64) @ weight.to(_F64).t(), dim=-1)
    kept = labels != ignore_index
    weights = torch.ones(labels.shape, dtype=_F64, device=labels.device) if row_weights is None else \
        row_weights.to(_F64)
    weights = weights * kept
    picked = log_probs.gather(1, labels.clamp(min=0).long()[:, None]).squeeze(1)
    loss = -(weights * picked).sum() / weights.sum()
    return loss.to(torch.promote_types(hidden.dtype, torch.float32))
