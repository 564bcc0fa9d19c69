"""Cross-entropy of a linear head (an LM head) without materialising the logits of every row at once.

`linear_cross_entropy(hidden [N, d], weight [V, d], labels [N], row_weights [N] | None)` is the weighted mean
over rows whose label is not `ignore_index` of `-log softmax(hidden @ weight^T)[label]`, computed in chunks
of rows: each chunk's [c, V] logits are made in fp32, reduced to the loss, turned into that chunk's
gradients (softmax minus one-hot, times the row weight) and dropped (fp64 inputs compute in fp64). The gradients are kept for the
backward pass, which only scales them, so peak memory is one chunk of logits instead of N x V (at a
vocabulary of 49k, 16k training rows would need 3 GB of fp32 logits, twice over with their gradient).
This is the chunked form of the fused linear cross-entropy of Liger-Kernel and Apple's Cut Cross-Entropy;
it runs wherever torch's matmul does. The tests' oracle is `tests/reference.py`.
"""

from __future__ import annotations

import torch

from mtp_kernels.checks import FLOAT_DTYPES, check_dim, check_tensor

CHUNK_BYTES = 1 << 28  # fp32 logits per chunk: 256 MiB


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, row_weights, chunk_rows):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        accumulate = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if want_weight else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk, target, scale = hidden[rows], labels[rows], row_weights[rows]
            logits = (chunk @ weight.T).to(accumulate)
            log_norm = torch.logsumexp(logits, dim=-1)
            total += ((log_norm - logits.gather(1, target[:, None]).squeeze(1)) * scale).sum()
            if want_hidden or want_weight:
                probs = logits.sub_(log_norm[:, None]).exp_()  # in place: the chunk's logits become its gradient
                probs[torch.arange(probs.shape[0], device=probs.device), target] -= 1.0
                probs.mul_(scale[:, None])
                if want_hidden:
                    grad_hidden[rows] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
                if want_weight:
                    grad_weight += probs.T @ chunk.to(accumulate)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph: the gradients were computed in forward, outside autograd
            raise RuntimeError("linear_cross_entropy has no second derivative (its gradients are computed in its "
                               "forward); compute the loss without create_graph=True")
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_output).to(ctx.weight_dtype),
                None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         row_weights: torch.Tensor | None = None, ignore_index: int = -100,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Weighted mean cross-entropy of `hidden @ weight^T` against `labels`; see the module docstring.
    Differentiable with respect to hidden and weight. A batch with no labelled row gives 0 (with a graph)."""
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device)
    check_dim("weight", weight, 1, hidden.shape[1], "hidden's width")
    check_tensor("labels", labels, ndim=1, dtypes=(torch.int64, torch.int32), device=hidden.device)
    check_dim("labels", labels, 0, hidden.shape[0], "one label per row of hidden")
    if row_weights is None:
        row_weights = torch.ones(labels.shape, dtype=torch.promote_types(hidden.dtype, torch.float32),
                                 device=hidden.device)
    check_tensor("row_weights", row_weights, ndim=1, device=hidden.device)
    check_dim("row_weights", row_weights, 0, hidden.shape[0], "one weight per row of hidden")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    labelled = labels != ignore_index
    if not bool(labelled.all()):
        hidden, labels, row_weights = hidden[labelled], labels[labelled], row_weights[labelled]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= weight.shape[0]):
        raise ValueError(f"labels hold ids outside [0, {weight.shape[0]}) other than ignore_index={ignore_index}")
    total_weight = row_weights.to(torch.promote_types(hidden.dtype, torch.float32)).sum()
    if not labels.numel() or float(total_weight) == 0.0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0
    chunk_rows = chunk_rows or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    normalised = (row_weights.to(total_weight.dtype) / total_weight).detach()
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels.long(), normalised, chunk_rows)
