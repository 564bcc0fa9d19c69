"""The written-out decoding forward (`step_forward`) computes what the model's own forward computes through
the MTP attention, for every family and the model options that change a layer, and steps aside where it
would not: regular tokens' states to fp32 rounding (its grouped products may block differently; on the
project's machine bit for bit), mask tokens' to a few roundings (their LoRA's B product sums a layer's q, k
and v at once)."""

import pytest
import torch
from helpers import FAMILIES, left_padded_prompts, randomize_adapter, stock_greedy, tiny_model
from torch import nn

import mtp_model
from mtp_kernels import cpu_linear
from mtp_model import decoding
from mtp_model.attention import MTPCache
from mtp_model.step_forward import StepForward

VARIANTS = [(family, {}) for family in sorted(FAMILIES)] + [
    ("llama", {"attention_bias": True, "mlp_bias": True, "hidden_act": "gelu"}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 32}}),
    ("qwen3", {"num_key_value_heads": 4}),  # no grouping
]


def patched(family, seed=0, num_masks=3, target_modules=None, **options):
    model = tiny_model(family, seed=seed, **options)
    config = mtp_model.MTPConfig(num_masks=num_masks, lora_rank=4)
    if target_modules is not None:
        config.target_modules = target_modules
    mtp_model.patch(model, config)
    return randomize_adapter(model, seed=seed)


def decoder(model, written_out: bool, num_masks=3, mode="quadratic"):
    params = mtp_model.decoding.SamplingParams()
    run = decoding.Decoder(model, num_masks=num_masks, mode=mode, use_sampler=True, params=params, generator=None)
    assert run.step_forward is not None  # the path this forward belongs to: the CPU's packed products
    if not written_out:
        run.step_forward = None
    return run


def prefill_then_step(run, ids, attention_mask, step_ids_of):
    """Hidden states of a prefill (prompt + masks) and of one quadratic step after it, the cache after it,
    and which of the step's cache slots hold mask tokens [B, S]."""
    B, P = ids.shape
    k = run.k
    cache = MTPCache(len(run.model.model.layers), B, P + 4 * run.full_step[0].size, ids.device)
    cache.starts = P - attention_mask.sum(1)
    positions = (torch.arange(P) - cache.starts[:, None]).clamp(min=0)
    prefill_ids = torch.cat([ids, run.mask_ids.expand(B, k)], dim=1)
    prefill_positions = torch.cat([positions, positions[:, -1:] + 1 + torch.arange(k)], dim=1)
    causal = torch.ones(P + k, P + k, dtype=torch.bool).tril()
    first = run.forward(prefill_ids, prefill_positions, cache, causal)
    cache.keep(torch.arange(P).expand(B, P).contiguous(), P + k)
    layout, template = run.full_step
    step_ids = step_ids_of(layout, template)
    step = run.forward(step_ids, positions[:, -1:] + 1 + layout.position_offset, cache, layout.block_mask)
    mask_slots = torch.zeros(B, cache.layers[0].keys.shape[2], dtype=torch.bool)
    mask_slots[:, P : P + step_ids.shape[1]] = step_ids >= run.vocab_size
    return first, step, cache, mask_slots


def assert_states_match(got, want, is_mask):
    """Regular tokens' states [B, T, ...] to 1e-6, mask tokens' (is_mask [B, T]) to 1e-4: the model's own
    forward adds their LoRA term from the live (trainable) factors, the step through stacked packed
    products, which round differently in fp32, and the difference grows through the layers."""
    torch.testing.assert_close(got[~is_mask], want[~is_mask], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[is_mask], want[is_mask], rtol=1e-4, atol=1e-4)


def written_out_and_own_forward(model, seed):
    """The written-out and the model's own forward over the same prefill and quadratic step (random
    regular tokens in the step's regular slots): (got, want, is_mask) for the prefill's and the step's
    hidden states and every layer's cache keys and values."""
    ids, attention_mask = left_padded_prompts([7, 3, 10], model.config.vocab_size, seed=seed)
    generator = torch.Generator()

    def step_ids(layout, template):
        template = template.expand(3, layout.size).clone()
        template[:, layout.regular] = torch.randint(3, model.config.vocab_size, (3, layout.regular.shape[0]),
                                                    generator=generator)
        return template

    outputs = []
    for written_out in (True, False):
        generator.manual_seed(seed)
        with torch.no_grad():
            outputs.append(prefill_then_step(decoder(model, written_out), ids, attention_mask, step_ids))
    fast, reference = outputs
    P = ids.shape[1]
    prefill_masks = (torch.arange(fast[0].shape[1]) >= P).expand(ids.shape[0], -1)
    return [(fast[0], reference[0], prefill_masks), (fast[1], reference[1], fast[3][:, P : P + fast[1].shape[1]])] + [
        (getattr(got, name).transpose(1, 2), getattr(want, name).transpose(1, 2), fast[3])
        for got, want in zip(fast[2].layers, reference[2].layers) for name in ("keys", "values")]


@pytest.mark.parametrize("family, options", VARIANTS, ids=lambda v: v if isinstance(v, str) else "-".join(v) or "")
def test_matches_the_model_forward(family, options):
    for got, want, is_mask in written_out_and_own_forward(patched(family, seed=1, **options), seed=1):
        assert_states_match(got, want, is_mask)


@pytest.mark.skipif(not cpu_linear.onednn_runs_bf16(), reason="this CPU's oneDNN emulates bf16: bf16 decoding keeps "
                                                              "the model's own forward")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matches_the_model_forward_in_bf16(family):
    """bf16 runs the same written-out forward where oneDNN runs bf16 natively: regular tokens' states and
    cache entries bit for bit (the same products, norms and fp32 attention as the model's own forward);
    mask tokens' within a few bf16 roundings (the packed LoRA term rounds in bf16, the model's in fp32)."""
    for got, want, is_mask in written_out_and_own_forward(patched(family, seed=2).to(torch.bfloat16), seed=2):
        assert got.dtype == torch.bfloat16
        assert torch.equal(got[~is_mask], want[~is_mask])
        torch.testing.assert_close(got[is_mask], want[is_mask], rtol=0.05, atol=0.25)


def test_a_gate_that_is_not_one_suffix_and_a_wide_step():
    # Masks scattered through the block (a batch row without drafts puts its masks in the draft slots) take
    # the masked-LoRA path; 8 masks quadratic (81 tokens) is past the merged product's row limit.
    model = patched("llama", seed=2, num_masks=8)
    ids, attention_mask = left_padded_prompts([4, 9], model.config.vocab_size, seed=2)

    def scattered(layout, template):
        template = template.expand(2, layout.size).clone()
        template[:, layout.regular] = 5
        template[1, layout.regular[1:]] = model.config.vocab_size + torch.arange(layout.regular.shape[0] - 1)
        return template

    with torch.no_grad():
        fast = prefill_then_step(decoder(model, True, num_masks=8), ids, attention_mask, scattered)
        reference = prefill_then_step(decoder(model, False, num_masks=8), ids, attention_mask, scattered)
    assert_states_match(fast[1], reference[1], fast[3][:, ids.shape[1] : ids.shape[1] + fast[1].shape[1]])


def test_lora_on_some_projections_only_and_generation_unchanged():
    model = tiny_model("qwen2", seed=4)
    ids, attention_mask = left_padded_prompts([6, 2], model.config.vocab_size, seed=4)
    expected = stock_greedy(model, ids, attention_mask, 20)
    config = mtp_model.MTPConfig(num_masks=4, lora_rank=4)
    config.target_modules = ["q_proj", "v_proj", "down_proj"]
    mtp_model.patch(model, config)
    randomize_adapter(model, seed=4)
    assert StepForward.build(model) is not None
    for mode in ("quadratic", "linear"):
        out = model.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=20, decoding=mode)
        assert torch.equal(out, expected)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class OffsetRMSNorm(nn.Module):  # Gemma's kind: x * rsqrt(mean(x^2) + eps) * (1 + weight)
    def __init__(self, size, eps=1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.zeros(size)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)


@pytest.mark.parametrize("change", ["forward hook", "pre-hook on a norm", "global hook", "custom projection",
                                    "subclassed layer", "unknown norm", "another RMSNorm"])
def test_steps_aside_for_what_it_does_not_know(change):
    model = patched("llama", seed=3)
    ids, attention_mask = left_padded_prompts([5, 8], model.config.vocab_size, seed=3)
    layer = model.model.layers[1]
    handle = None
    if change == "forward hook":
        handle = layer.mlp.register_forward_hook(lambda module, args, out: out * 0.5)
    elif change == "pre-hook on a norm":
        handle = layer.input_layernorm.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    elif change == "global hook":
        handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    elif change == "custom projection":
        old = layer.mlp.up_proj.base_layer
        layer.mlp.up_proj = ScaledLinear(old.in_features, old.out_features, bias=False)
    elif change == "subclassed layer":
        layer.__class__ = type("MyLayer", (type(layer),), {})
    elif change == "unknown norm":
        layer.post_attention_layernorm = nn.LayerNorm(model.config.hidden_size)
    else:
        layer.input_layernorm = OffsetRMSNorm(model.config.hidden_size)
    try:
        assert StepForward.build(model) is None
        # Decoding then runs the model's own forward, so whatever the change does, MTP output is its greedy.
        with torch.no_grad():
            expected = stock_greedy(model, ids, attention_mask, 16)
        out = model.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=16)
        assert torch.equal(out, expected)
    finally:
        if handle is not None:
            handle.remove()


def test_not_used_off_the_prepacked_path(monkeypatch):
    monkeypatch.setenv("MTP_KERNELS", "torch")
    model = patched("llama", seed=5)
    run = decoding.Decoder(model, num_masks=3, mode="linear", use_sampler=True,
                            params=mtp_model.decoding.SamplingParams(), generator=None)
    assert run.step_forward is None
