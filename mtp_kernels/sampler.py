"""Draft sampling and acceptance: the LM-head product fused with the choice of token.

- `SamplingParams`: temperature (0 = greedy), top_k, top_p, validated once.
- `choose_tokens(hidden [N, d], weight [V, d], params, noise [N, V] | None) -> [N] int64`.
- `draft_chain(mlp, embed_weight [V, d], lm_weight [V, d], first_tokens [B], latents [B, k, d], params,
  noise [B, k, V] | None) -> drafts [B, k]`: y_j = choose(lm_head(mlp([embed(y_{j-1}); z_j]))).
- `accept_greedy(drafts [B, k], targets [B, k+1]) -> (accepted [B], next_token [B])`.
- `accept_sampling(logits [B, k+1, V], drafts [B, k], params, uniform [B, k], noise [B, k+1, V])
  -> (accepted [B], next_token [B])`.

Randomness (Exp(1) noise, uniforms) is drawn in torch by the caller and passed in, so the reference and the
kernels agree exactly.

(Triton kernels: to be added; until then every device uses the torch reference.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp_kernels import reference


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def choose_tokens(hidden, weight, params: SamplingParams = SamplingParams(), noise=None):
    if not params.greedy and noise is None:
        raise ValueError("noise is required when sampling (temperature > 0)")
    return reference.choose_tokens(hidden, weight, params.temperature, params.top_k, params.top_p, noise)


def draft_chain(mlp, embed_weight, lm_weight, first_tokens, latents, params=SamplingParams(), noise=None):
    drafts = []
    previous = first_tokens
    for j in range(latents.shape[1]):
        features = torch.cat([embed_weight[previous].to(latents.dtype), latents[:, j]], dim=-1)
        previous = choose_tokens(mlp(features), lm_weight, params, None if noise is None else noise[:, j])
        drafts.append(previous)
    return torch.stack(drafts, dim=1)


def accept_greedy(drafts, targets):
    return reference.accept_greedy(drafts, targets)


def accept_sampling(logits, drafts, params: SamplingParams, uniform, noise):
    if params.greedy:
        raise ValueError("accept_sampling needs temperature > 0; use accept_greedy for greedy decoding")
    return reference.accept_sampling(logits, drafts, uniform, noise, params.temperature, params.top_k, params.top_p)
