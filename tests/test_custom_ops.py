"""The ops as torch custom ops: torch.library.opcheck on each (schema, fake implementation, autograd
registration, AOT dispatch), and each public function compiled with torch.compile(fullgraph=True) giving
what it gives in eager."""

import pytest
import torch

import mtp_kernels
from mtp_kernels import SamplingParams, backend
from mtp_model.layout import step_layout
from mtp_model.modules import SamplerHead


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def exp_noise(*shape, seed=0):
    return torch.empty(*shape).exponential_(generator=torch.Generator().manual_seed(seed))


def sampler_weights(d, seed=0):
    torch.manual_seed(seed)
    head = SamplerHead(d)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return head.weights()


# Each op's public function with small, odd-shaped CPU inputs: (name, function, args).
def gated_lora_case(requires_grad=False):
    x, lora_a, lora_b = rand(3, 5, 13, seed=1), rand(3, 13, seed=2), rand(11, 3, seed=3)
    if requires_grad:
        x, lora_a, lora_b = (t.requires_grad_(True) for t in (x, lora_a, lora_b))
    gate = torch.rand(3, 5, generator=torch.Generator().manual_seed(4)) < 0.5
    return mtp_kernels.gated_lora_linear, (x, rand(11, 13, seed=5), rand(11, seed=6), lora_a, lora_b, 1.5, gate)


def tree_attention_case():
    T, S = 9, 23
    lengths, starts = torch.tensor([3, 11, 0]), torch.tensor([1, 0, 0])
    block_mask = step_layout(2, 2, "quadratic", torch.device("cpu")).block_mask
    assert block_mask.shape == (T, T)
    return mtp_kernels.tree_attention, (rand(3, 6, T, 16, seed=7), rand(3, 2, S, 16, seed=8), rand(3, 2, S, 16, seed=9),
                                        lengths, block_mask, None, starts)


def choose_case(params):
    N, V, d = 9, 37, 12
    noise = None if params.greedy else exp_noise(N, V, seed=10)
    return mtp_kernels.choose_tokens, (rand(N, d, seed=11), rand(V, d, seed=12), params, noise)


def draft_chain_case(params, draft_vocab=False):
    B, k, d, V = 3, 4, 12, 41
    embed, lm = rand(V, d, seed=13), rand(V, d, seed=14)
    draft_tokens = torch.tensor([0, 3, 5, 8, 13, 21, 34, 40, 2]) if draft_vocab else None
    if draft_tokens is not None:
        lm = lm[draft_tokens].contiguous()
    noise = None if params.greedy else exp_noise(B, k, lm.shape[0], seed=15)
    return mtp_kernels.draft_chain, (sampler_weights(d), embed, lm, torch.tensor([1, 7, 40]), rand(B, k, d, seed=16),
                                     params, noise, draft_tokens)


def accept_greedy_case():
    drafts = torch.tensor([[4, 5, 6], [4, 9, 6], [-1, -1, -1]])
    return mtp_kernels.accept_greedy, (drafts, torch.tensor([[4, 5, 6, 8], [4, 5, 6, 8], [4, 5, 6, 8]]))


def accept_sampling_case(params):
    B, k, V = 3, 2, 19
    drafts = torch.tensor([[4, 5], [-1, -1], [18, 0]])
    return mtp_kernels.accept_sampling, (rand(B, k + 1, V, seed=17), drafts, params, torch.rand(B, k),
                                         exp_noise(B, k + 1, V, seed=18))


GREEDY, SAMPLE, FILTERED = SamplingParams(), SamplingParams(0.8), SamplingParams(0.9, top_k=5, top_p=0.8)
CASES = {
    "gated_lora_linear": lambda: gated_lora_case(),
    "gated_lora_linear_grad": lambda: gated_lora_case(requires_grad=True),
    "tree_attention": tree_attention_case,
    "choose_tokens_greedy": lambda: choose_case(GREEDY),
    "choose_tokens_sample": lambda: choose_case(SAMPLE),
    "choose_tokens_filtered": lambda: choose_case(FILTERED),
    "draft_chain_greedy": lambda: draft_chain_case(GREEDY),
    "draft_chain_filtered_draft_vocab": lambda: draft_chain_case(FILTERED, draft_vocab=True),
    "accept_greedy": accept_greedy_case,
    "accept_sampling": lambda: accept_sampling_case(SamplingParams(1.3, top_k=10)),
}


class Recorder(torch.overrides.TorchFunctionMode):
    """Records the torch.ops.mtp_kernels op a public function calls, and its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if isinstance(func, torch._ops.OpOverload | torch._ops.OpOverloadPacket) and "mtp_kernels" in str(func):
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["auto", "torch"])
@pytest.mark.parametrize("case", CASES)
def test_opcheck(monkeypatch, mode, case):
    monkeypatch.setenv(backend.ENV_VAR, mode)
    function, args = CASES[case]()
    with Recorder() as recorder:
        function(*args)
    (op, op_args, op_kwargs), = recorder.calls  # one op call per public call
    torch.library.opcheck(op, op_args, op_kwargs)


def test_opcheck_through_the_interpreter(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "interpret")
    for case in ("gated_lora_linear_grad", "tree_attention", "choose_tokens_sample", "draft_chain_greedy"):
        function, args = CASES[case]()
        with Recorder() as recorder:
            function(*args)
        (op, op_args, op_kwargs), = recorder.calls
        torch.library.opcheck(op, op_args, op_kwargs, test_utils=("test_schema", "test_faketensor"))


def same(a, b):
    if isinstance(a, tuple):
        return all(same(x, y) for x, y in zip(a, b, strict=True))
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("case", CASES)
def test_each_public_function_compiles_with_fullgraph(monkeypatch, case):
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    function, args = CASES[case]()
    torch._dynamo.reset()
    compiled = torch.compile(function, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got, want = compiled(*args), function(*args)
    if case.startswith("gated_lora"):
        # Compiled, a CPU gated LoRA is traced as torch_ops' torch ops (MKL); eager runs oneDNN on
        # packed weights: the same sums, to fp32 rounding.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert same(got, want)


def test_gated_lora_gradients_through_a_compiled_graph():
    function, args = gated_lora_case(requires_grad=True)
    x, weight, bias, lora_a, lora_b, scaling, gate = args
    torch._dynamo.reset()
    compiled = torch.compile(function, fullgraph=True, backend="aot_eager")
    grad_out = rand(3, 5, 11, seed=19)
    compiled(*args).backward(grad_out)
    got = [t.grad.clone() for t in (x, lora_a, lora_b)]
    for t in (x, lora_a, lora_b):
        t.grad = None
    function(*args).backward(grad_out)
    for have, want in zip(got, (x.grad, lora_a.grad, lora_b.grad)):
        # compiled: torch_ops' torch ops and their autograd; eager: the op's own backward
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)


def test_ops_compose_in_one_compiled_graph():
    """A verify-and-draft step's kernel calls (attention, choice, acceptance, drafts) as one graph."""
    attention, attention_args = tree_attention_case()
    _, (hidden, weight, *_) = choose_case(GREEDY)
    _, (sampler, embed, lm, first, latents, *_) = draft_chain_case(GREEDY)
    drafts = torch.tensor([[3, 9], [1, 1], [0, 5]])

    def step(q, k, v, lengths, block_mask, scale, starts):
        out = attention(q, k, v, lengths, block_mask, scale, starts)
        targets = mtp_kernels.choose_tokens(hidden + out[:, 0, :1, :12].sum(), weight).view(3, 3)
        accepted, bonus = mtp_kernels.accept_greedy(drafts, targets)
        return accepted, mtp_kernels.draft_chain(sampler, embed, lm, bonus, latents)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert same(compiled(*attention_args), step(*attention_args))


def test_a_decoding_step_forward_compiles_with_fullgraph(monkeypatch):
    """A quadratic verify step's whole forward on a tiny patched Llama (the gate, transformers' decoder stack,
    the MTPCache writes, the tree attention and gated LoRA ops) as one graph, equal to eager.

    MTP_KERNELS=torch keeps the decoder off `StepForward` (the CPU's fp32 written-out forward, which
    finds packed weights by data pointer and memoises its visibility mask: eager only)."""
    from helpers import randomize_adapter, tiny_model

    import mtp_model
    from mtp_model.attention import MTPCache
    from mtp_model.decoding import Decoder

    monkeypatch.setenv(backend.ENV_VAR, "torch")
    model = randomize_adapter(mtp_model.patch(tiny_model("llama"), mtp_model.MTPConfig(num_masks=3)))
    decoder = Decoder(model, num_masks=3, mode="quadratic", use_sampler=True, params=GREEDY, generator=None)
    assert decoder.step_forward is None
    B, P = 2, 5
    layout, template = decoder.full_step
    cache = MTPCache(len(model.model.layers), B, P + layout.size + 3, torch.device("cpu"))
    with torch.no_grad():
        decoder.forward(torch.randint(3, 90, (B, P)), torch.arange(P).expand(B, P), cache,
                        torch.ones(P, P, dtype=torch.bool).tril())
        cache.keep(torch.arange(P).expand(B, P).contiguous(), P)
        ids = template.expand(B, layout.size).clone()
        ids[:, layout.regular] = torch.tensor([[7, 8, 9, 10], [11, 12, 13, 14]])
        positions = P + layout.position_offset.expand(B, layout.size)

        def step(ids, positions):  # writes the block's keys and values at the same slots each time
            return decoder.forward(ids, positions, cache, layout.block_mask)

        expected = step(ids, positions)
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(ids, positions), expected)
