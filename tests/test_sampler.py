"""Fused LM-head choice, the draft chain and the acceptance rules."""

import pytest
import reference
import torch
import torch.nn.functional as F

import mtp_kernels
from mtp_kernels import SamplingParams, backend, cpu_linear
from mtp_kernels import sampler as sampler_ops
from mtp_model.modules import SamplerHead

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CHI_SQUARE_CRITICAL_DF4_P001 = 18.467  # chi-square, 4 degrees of freedom, p = 0.001


def head(N, V, D, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=generator).to(dtype), torch.randn(V, D, generator=generator).to(dtype)


def exp_noise(*shape, seed=0):
    return torch.empty(*shape).exponential_(generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("N", "V", "D"), [(1, 1000, 72), (7, 257, 64), (33, 1531, 40)])
def test_greedy_equals_argmax_of_full_logits(kernel_mode, dtype, N, V, D):
    hidden, weight = head(N, V, D, dtype, seed=N)
    tokens = mtp_kernels.choose_tokens(hidden, weight)
    assert torch.equal(tokens, F.linear(hidden, weight).argmax(-1))


def test_ties_go_to_the_lowest_index(kernel_mode):
    hidden = torch.ones(3, 16)
    weight = torch.zeros(600, 16)
    weight[[5, 300, 599]] = 1.0  # three equal maxima, in different vocabulary tiles
    weight[[2, 1]] = -1.0
    assert mtp_kernels.choose_tokens(hidden, weight).tolist() == [5, 5, 5]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1e-4, 0.7, 1.0, 3.0])
def test_sampling_equals_reference_with_the_same_noise(kernel_mode, dtype, temperature):
    hidden, weight = head(6, 700, 48, dtype, seed=3)
    noise = exp_noise(6, 700, seed=4)
    params = SamplingParams(temperature)
    expected = reference.choose_tokens(hidden, weight, temperature, None, None, noise)
    assert torch.equal(mtp_kernels.choose_tokens(hidden, weight, params, noise), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 20, 40])
def test_gpu_tiles_through_the_interpreter(monkeypatch, dtype, N):
    """The tile sizes a GPU launch picks (every branch of `_choice_blocks`), run by the interpreter."""
    monkeypatch.setenv("MTP_KERNELS", "interpret")
    gpu_tiles = sampler_ops._choice_blocks
    monkeypatch.setattr(sampler_ops, "_choice_blocks", lambda n, d, on_cuda, *rest: gpu_tiles(n, d, True, *rest))
    hidden, weight = head(N, 300, 64, dtype, seed=N)
    noise = exp_noise(N, 300, seed=N)
    exact = hidden.double() @ weight.double().T
    for params, keys in ((None, exact), (SamplingParams(0.8), exact / 0.8 - noise.double().log())):
        got = mtp_kernels.choose_tokens(hidden, weight, *((params, noise) if params else ()))
        want = reference.choose_tokens(hidden, weight, *((0.8, None, None, noise) if params else ()))
        # Identical, but where a 16-bit logit sits at a rounding boundary, which a different summation order
        # may round the other way (stock's own near-ties): then the two keys are within rounding.
        slack = 0.0 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * keys.abs().max().item()
        gap = (keys.gather(1, want[:, None]) - keys.gather(1, got[:, None])).abs()
        assert (got == want).float().mean() >= 0.9 and bool((gap <= slack).all()), (params, got, want)


def test_temperature_near_zero_is_greedy(kernel_mode):
    hidden, weight = head(9, 301, 32, torch.float32, seed=5)
    params = SamplingParams(1e-6)
    assert torch.equal(mtp_kernels.choose_tokens(hidden, weight, params, exp_noise(9, 301)),
                       mtp_kernels.choose_tokens(hidden, weight))


@pytest.mark.parametrize(("top_k", "top_p"), [(5, None), (None, 0.8), (20, 0.5), (1, None)])
def test_top_k_top_p_follow_the_reference(kernel_mode, top_k, top_p):
    hidden, weight = head(11, 301, 32, torch.float32, seed=6)
    noise = exp_noise(11, 301, seed=7)
    params = SamplingParams(0.9, top_k, top_p)
    expected = reference.choose_tokens(hidden, weight, 0.9, top_k, top_p, noise)
    tokens = mtp_kernels.choose_tokens(hidden, weight, params, noise)
    assert torch.equal(tokens, expected)
    if top_k == 1:
        assert torch.equal(tokens, mtp_kernels.choose_tokens(hidden, weight))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_top_k_top_p_in_half_precision_follow_the_reference(kernel_mode, dtype):
    hidden, weight = head(5, 203, 40, dtype, seed=8)
    noise = exp_noise(5, 203, seed=9)
    expected = reference.choose_tokens(hidden, weight, 0.7, 6, 0.9, noise)
    assert torch.equal(mtp_kernels.choose_tokens(hidden, weight, SamplingParams(0.7, 6, 0.9), noise), expected)


def test_top_k_keeps_every_token_tied_with_the_kth(kernel_mode):
    """Far more tokens tie with the k-th best than the kernel keeps per vocabulary split: all stay in play."""
    rows, vocab = 8, 150
    hidden = torch.ones(rows, 8)  # every row sees the same logits; the noise differs
    weight = 0.1 * torch.randn(vocab, 8, generator=torch.Generator().manual_seed(10))
    weight[10:60] = 1.0  # 50 tokens share the best logit
    noise = exp_noise(rows, vocab, seed=11)
    params = SamplingParams(1.0, top_k=3)
    tokens = mtp_kernels.choose_tokens(hidden, weight, params, noise)
    assert torch.equal(tokens, reference.choose_tokens(hidden, weight, 1.0, 3, None, noise))
    assert all(10 <= token < 60 for token in tokens.tolist()) and len(set(tokens.tolist())) > 3


def test_top_k_not_below_the_vocabulary_filters_nothing(kernel_mode):
    hidden, weight = head(3, 40, 16, torch.float32, seed=12)
    noise = exp_noise(3, 40, seed=13)
    assert torch.equal(mtp_kernels.choose_tokens(hidden, weight, SamplingParams(0.9, top_k=40), noise),
                       mtp_kernels.choose_tokens(hidden, weight, SamplingParams(0.9), noise))


def draft_chain_inputs(V, d, B, k, seed):
    """(sampler weights, embed [V, d], lm [V, d], first tokens [B], latents [B, k, d]) for draft_chain."""
    torch.manual_seed(seed)
    embed, lm = torch.randn(V, d), torch.randn(V, d)
    sampler = SamplerHead(d).requires_grad_(False)  # an inference model's, as decoding sees it
    for module in sampler.mlp:  # LayerNorms away from their identity initialisation
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight)
            torch.nn.init.normal_(module.bias)
    return sampler.weights(), embed, lm, torch.randint(0, V, (B,)), torch.randn(B, k, d)


@pytest.mark.parametrize("token_table", [True, False])
def test_draft_chain_feeds_each_draft_back(kernel_mode, monkeypatch, token_table):
    if not token_table:  # the per-step product a model with a large vocabulary takes
        monkeypatch.setattr(sampler_ops, "TOKEN_TABLE_MAX_BYTES", 0)
    k = 4
    sampler, embed, lm, first, latents = draft_chain_inputs(V=50, d=16, B=3, k=k, seed=0)
    with torch.no_grad():
        drafts = mtp_kernels.draft_chain(sampler, embed, lm, first, latents)
        previous = first
        for j in range(k):
            features = F.linear(torch.cat([embed[previous], latents[:, j]], -1), sampler.input_weight, sampler.input_bias)
            logits = sampler_ops.sampler_body(features, latents[:, j], sampler).double() @ lm.double().t()
            expected = logits.argmax(-1)
            assert torch.equal(drafts[:, j], expected)
            previous = expected


def test_the_token_table_follows_the_sampler(monkeypatch):
    sampler, embed, lm, first, latents = draft_chain_inputs(V=40, d=8, B=2, k=3, seed=5)
    with torch.no_grad():
        before = mtp_kernels.draft_chain(sampler, embed, lm, first, latents)
        sampler.input_weight[:, :8].mul_(-3.0)  # a training step on the token half, in place
        after = mtp_kernels.draft_chain(sampler, embed, lm, first, latents)
        monkeypatch.setattr(sampler_ops, "TOKEN_TABLE_MAX_BYTES", 0)
        without_table = mtp_kernels.draft_chain(sampler, embed, lm, first, latents)
    assert torch.equal(after, without_table) and not torch.equal(before, after)


def test_the_token_table_follows_an_optimizer_step_that_bumps_no_version(monkeypatch):
    """Fused AdamW (the HF Trainer's default) writes the sampler's parameters without bumping their
    versions; a draft chain called after its step, outside generate, must use the new input layer."""
    sampler, embed, lm, first, latents = draft_chain_inputs(V=40, d=8, B=2, k=3, seed=5)
    sampler.input_weight.requires_grad_(True)  # a sampler in training
    with torch.no_grad():
        before = mtp_kernels.draft_chain(sampler, embed, lm, first, latents)
    sampler.input_weight.grad = torch.randn_like(sampler.input_weight)
    version = sampler.input_weight._version
    torch.optim.AdamW([sampler.input_weight], lr=1.0, fused=True).step()
    assert sampler.input_weight._version == version  # the premise: no version bump
    with torch.no_grad():
        after = mtp_kernels.draft_chain(sampler, embed, lm, first, latents)
        monkeypatch.setattr(sampler_ops, "TOKEN_TABLE_MAX_BYTES", 0)
        without_table = mtp_kernels.draft_chain(sampler, embed, lm, first, latents)
    assert torch.equal(after, without_table) and not torch.equal(before, after)


def test_a_sampler_that_does_not_fit_the_embeddings_is_named():
    sampler, embed, lm, first, latents = draft_chain_inputs(V=30, d=8, B=2, k=3, seed=2)
    with torch.no_grad(), pytest.raises(ValueError, match="input layer"):
        mtp_kernels.draft_chain(SamplerHead(12).weights(), embed, lm, first, latents)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.0, None, None), (0.8, None, None), (0.9, 5, 0.8)])
def test_cpu_choice_on_the_packed_head_follows_the_reference(monkeypatch, temperature, top_k, top_p):
    """Default mode: on a CPU in fp32 the logits come from oneDNN on the packed weight."""
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    packed = []
    original = cpu_linear._packed_weight
    monkeypatch.setattr(cpu_linear, "_packed_weight", lambda weight: packed.append(weight) or original(weight))
    hidden, weight = head(13, 1531, 40, torch.float32, seed=14)
    noise = exp_noise(13, 1531, seed=15)
    params = SamplingParams(temperature, top_k, top_p)
    tokens = mtp_kernels.choose_tokens(hidden, weight, params, noise)
    assert torch.equal(tokens, reference.choose_tokens(hidden, weight, temperature, top_k, top_p, noise))
    assert bool(packed) == cpu_linear.packing_applies(hidden.device, hidden.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_choice_in_half_precision_is_the_reference(monkeypatch, dtype):
    hidden, weight = head(7, 603, 24, dtype, seed=16)
    noise = exp_noise(7, 603, seed=17)
    for params in (SamplingParams(), SamplingParams(0.7, 6, 0.9)):
        monkeypatch.delenv(backend.ENV_VAR, raising=False)
        tokens = mtp_kernels.choose_tokens(hidden, weight, params, noise)
        monkeypatch.setenv(backend.ENV_VAR, "torch")
        assert torch.equal(tokens, mtp_kernels.choose_tokens(hidden, weight, params, noise))


def test_draft_chain_on_the_packed_head_equals_the_reference(monkeypatch):
    sampler, embed, lm, first, latents = draft_chain_inputs(V=300, d=16, B=2, k=5, seed=1)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    packed = mtp_kernels.draft_chain(sampler, embed, lm, first, latents)
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert torch.equal(packed, mtp_kernels.draft_chain(sampler, embed, lm, first, latents))


def test_sampling_drafts_need_noise_for_every_step():
    sampler, embed, lm, first, latents = draft_chain_inputs(V=30, d=8, B=2, k=3, seed=2)
    with torch.no_grad(), pytest.raises(ValueError, match="noise"):
        mtp_kernels.draft_chain(sampler, embed, lm, first, latents, SamplingParams(0.7), exp_noise(2, 30, seed=3))


def test_sampler_head_computes_what_its_mlp_does():
    torch.manual_seed(4)
    head = SamplerHead(24)
    for module in head.mlp:  # LayerNorms away from their identity initialisation
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight)
            torch.nn.init.normal_(module.bias)
    features = torch.randn(3, 5, 48)
    assert torch.equal(head(features), head.mlp(features))


@pytest.mark.parametrize("case", ["all NaN", "all -inf", "one NaN in a later tile"])
def test_rows_without_a_finite_maximum_choose_as_torch_argmax_does(kernel_mode, case):
    """All -inf logits (an fp16 overflow) pick the first token, a NaN counts as the largest: never an id
    outside the vocabulary."""
    hidden, weight = head(3, 300, 16, torch.float32, seed=3)
    weight[:, 0] = weight[:, 0].abs() + 0.1
    if case == "all NaN":
        hidden[1] = float("nan")
    elif case == "all -inf":
        hidden[1] = 0.0
        hidden[1, 0] = float("-inf")  # times a positive column: every logit -inf
    else:
        weight[250, 3] = float("nan")  # token 250's logit is NaN in every row
    logits = hidden @ weight.t()
    assert mtp_kernels.choose_tokens(hidden, weight).tolist() == logits.argmax(-1).tolist()
    noise = exp_noise(3, 300, seed=3)
    assert mtp_kernels.choose_tokens(hidden, weight, SamplingParams(1.0), noise).tolist() == (
        (logits - noise.log()).argmax(-1).tolist())


def test_float64_logits_choose_in_float64(kernel_mode):
    hidden = torch.tensor([[1.0, 1e-9]], dtype=torch.float64)
    weight = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)  # logits 1 and 1 + 1e-9: fp32 ties them
    assert mtp_kernels.choose_tokens(hidden, weight).tolist() == [1]


def test_draft_chain_of_no_steps_is_empty(kernel_mode):
    sampler, embed, lm, first, latents = draft_chain_inputs(V=50, d=16, B=3, k=0, seed=0)
    assert mtp_kernels.draft_chain(sampler, embed, lm, first, latents).shape == (3, 0)


def test_accept_greedy_is_a_prefix_not_a_count():
    drafts = torch.tensor([[4, 5, 6], [4, 9, 6], [7, 5, 6], [4, 5, 6], [-1, -1, -1], [-1, -1, -1]])
    targets = torch.tensor([[4, 5, 6, 8], [4, 5, 6, 8], [4, 5, 6, 8], [4, 5, 1, 8], [4, 5, 6, 8], [-1, -1, 2, 3]])
    accepted, next_token = mtp_kernels.accept_greedy(drafts, targets)
    assert accepted.tolist() == [3, 1, 0, 2, 0, 0]  # row 2 matches later drafts but not the first; -1 is no draft
    assert next_token.tolist() == [8, 5, 4, 1, 4, -1]


def _chi_square(samples, probs):
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("draft_kind", ["likely", "unlikely", "from_another_distribution", "none"])
def test_acceptance_keeps_the_target_distribution(draft_kind):
    n, V = 40_000, 5
    generator = torch.Generator().manual_seed(11)
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, -1.5], [0.1, 1.2, 0.3, -0.4, 0.0]])
    params = SamplingParams(temperature=0.8)
    target = (logits / 0.8).softmax(-1)
    if draft_kind == "likely":
        drafts = torch.full((n, 1), 0)
    elif draft_kind == "unlikely":
        drafts = torch.full((n, 1), 4)
    elif draft_kind == "none":
        drafts = torch.full((n, 1), -1)
    else:
        q = torch.tensor([0.05, 0.05, 0.6, 0.1, 0.2])
        drafts = torch.multinomial(q, n, replacement=True, generator=generator)[:, None]
    uniform = torch.rand(n, 1, generator=generator)
    noise = torch.empty(n, 2, V).exponential_(generator=generator)
    accepted, next_token = mtp_kernels.accept_sampling(logits.expand(n, 2, V), drafts, params, uniform, noise)
    first = torch.where(accepted == 1, drafts[:, 0], next_token)
    assert _chi_square(first, target[0]) < CHI_SQUARE_CRITICAL_DF4_P001
    if draft_kind != "none":  # after accepting, the bonus token follows the next distribution
        assert _chi_square(next_token[accepted == 1], target[1]) < CHI_SQUARE_CRITICAL_DF4_P001
    else:
        assert int(accepted.sum()) == 0


def test_acceptance_rule_is_exact_against_the_reference():
    """Rows that accept some drafts, all of them, none (each draft the token the race would pick, so that
    only the exclusion of a rejected draft keeps it from coming back), and a "no draft" (-1)."""
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 4, 30, generator=generator) * 2
    noise = torch.empty(8, 4, 30).exponential_(generator=generator)
    params = SamplingParams(1.3, top_k=10)
    race_winners = torch.stack([reference.choose_tokens(logits[b], torch.eye(30), 1.3, 10, None, noise[b])
                                for b in range(8)])  # [B, k+1]: what the race picks at each position
    drafts = race_winners[:, :3].clone()
    drafts[6:] = torch.randint(0, 30, (2, 3), generator=generator)
    drafts[7, 1] = -1
    uniform = torch.rand(8, 3, generator=generator)
    uniform[:2] = 0.0  # accept every draft
    uniform[2:4] = 1.0  # reject the first draft
    got = mtp_kernels.accept_sampling(logits, drafts, params, uniform, noise)
    expected = reference.accept_sampling(logits, drafts, uniform, noise, 1.3, 10, None)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert got[0][:4].tolist() == [3, 3, 0, 0]
    assert (got[1][2:4] != drafts[2:4, 0]).all()  # a rejected draft never comes back as the next token


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: SamplingParams(temperature=-0.1), "temperature"),
        (lambda: SamplingParams(0.5, top_p=0.0), "top_p"),
        (lambda: SamplingParams(0.5, top_p=1.2), "top_p"),
        (lambda: SamplingParams(0.5, top_k=0), "top_k"),
        (lambda: mtp_kernels.choose_tokens(torch.zeros(2, 8), torch.zeros(5, 9)), "weight"),
        (lambda: mtp_kernels.choose_tokens(torch.zeros(2, 8), torch.zeros(5, 8), SamplingParams(1.0)), "noise"),
        (lambda: mtp_kernels.choose_tokens(torch.zeros(2, 8), torch.zeros(5, 8), SamplingParams(1.0), torch.ones(2, 4)), "noise"),
        (lambda: mtp_kernels.accept_greedy(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)), "one more"),
        (lambda: mtp_kernels.accept_sampling(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long), SamplingParams(), torch.zeros(2, 3), torch.ones(2, 4, 5)), "temperature"),
        (lambda: mtp_kernels.accept_sampling(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long), SamplingParams(1.0), torch.zeros(2, 2), torch.ones(2, 4, 5)), "uniform"),
        (lambda: SamplingParams(float("nan")), "temperature"),
        (lambda: SamplingParams(0.5, top_k=2.5), "top_k must be an integer"),
        (lambda: mtp_kernels.choose_tokens(torch.zeros(2, 8), torch.zeros(5, 8), SamplingParams(1.0), torch.ones(2, 5, dtype=torch.long)), "noise has dtype"),
        (lambda: mtp_kernels.accept_sampling(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long), SamplingParams(1.0), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, 5)), "uniform has dtype"),
        (lambda: mtp_kernels.draft_chain(*draft_chain_inputs(V=50, d=16, B=3, k=2, seed=0)[:3], torch.tensor([0, -1, 3]), torch.randn(3, 2, 16)), "first_tokens holds ids outside"),
        (lambda: mtp_kernels.draft_chain(draft_chain_inputs(V=50, d=16, B=3, k=2, seed=0)[0]._replace(hidden_weight=torch.zeros(16, 16, device="meta")), *draft_chain_inputs(V=50, d=16, B=3, k=2, seed=0)[1:]), "sampler.hidden_weight is on meta"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("N", "V", "D"), [(1, 32000, 2048), (64, 128256, 4096), (512, 151936, 2048), (3, 1001, 80)])
def test_compiled_choice_on_gpu(dtype, N, V, D):
    hidden, weight = (t.cuda() for t in head(N, V, D, dtype))
    assert torch.equal(mtp_kernels.choose_tokens(hidden, weight), F.linear(hidden, weight).argmax(-1))
    noise = exp_noise(N, V).cuda()
    expected = reference.choose_tokens(hidden, weight, 0.8, None, None, noise)
    assert torch.equal(mtp_kernels.choose_tokens(hidden, weight, SamplingParams(0.8), noise), expected)
    for top_k, top_p in [(50, None), (8, 0.9), (64, 0.95), (100, None)]:  # the last: past the fused limit
        expected = reference.choose_tokens(hidden, weight, 0.8, top_k, top_p, noise)
        tokens = mtp_kernels.choose_tokens(hidden, weight, SamplingParams(0.8, top_k, top_p), noise)
        assert torch.equal(tokens, expected), (top_k, top_p)
