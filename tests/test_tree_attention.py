"""tree_attention against a float64 reference and SDPA with a materialised mask."""

import importlib

import pytest
import reference
import torch
import torch.nn.functional as F

import mtp_kernels
from mtp_model.layout import step_layout

tree_attention_module = importlib.import_module("mtp_kernels.tree_attention")  # the package exports the op under the same name
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def quadratic_mask(k):
    return step_layout(k, k, "quadratic", torch.device("cpu")).block_mask


def random_inputs(B, Hq, Hkv, T, D, S, dtype, seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=generator).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=generator).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=generator).to(dtype)
    lengths = torch.randint(0, S - T + 1, (B,), generator=generator)
    starts = (torch.rand(B, generator=generator) * lengths).long()
    return [t.to(device) for t in (q, k, v, lengths, starts)]


def sdpa_same_dtype(q, k, v, lengths, block_mask, starts):
    """Torch's own attention in q's dtype with a materialised [B, 1, T, S] mask: the baseline error."""
    allowed = reference.tree_attention_allowed(lengths, block_mask, k.shape[2], starts)
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=allowed[:, None]
    )
    return out.nan_to_num(0.0)  # SDPA gives NaN where a query sees nothing; the op gives 0


def check_close(out, q, k, v, lengths, block_mask, starts):
    """Error vs a float64 reference within 2x the error of torch's SDPA in the same dtype, plus a few units
    of rounding at the output's scale: the online softmax rescales its accumulator once per key tile and
    each rescale rounds, while SDPA's own error (the baseline) depends on the CPU's thread count."""
    exact = reference.tree_attention(q.double(), k.double(), v.double(), lengths, block_mask, None, starts)
    baseline = sdpa_same_dtype(q, k, v, lengths, block_mask, starts).double()
    atol = 4 * torch.finfo(q.dtype).eps * max(exact.abs().max().item(), 1.0)
    budget = 2 * (baseline - exact).abs().max().item() + atol
    error = (out.double() - exact).abs().max().item()
    assert error <= budget, f"max error {error:.3g} > {budget:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("D", "T", "mask"), [(64, 16, "quadratic3"), (80, 9, "random"), (96, 4, "causal"), (128, 1, "causal"), (256, 25, "quadratic4")])
def test_matches_float64_reference(kernel_mode, dtype, D, T, mask):
    q, k, v, lengths, starts = random_inputs(3, 4, 2, T, D, 48, dtype, seed=D + T)
    if mask == "random":
        block_mask = torch.rand(T, T, generator=torch.Generator().manual_seed(T)) > 0.5
        block_mask[1] = False  # a query that sees nothing in the block
    elif mask == "causal":
        block_mask = torch.ones(T, T, dtype=torch.bool).tril()
    else:
        block_mask = quadratic_mask(int(mask[-1]))
    out = mtp_kernels.tree_attention(q, k, v, lengths, block_mask, None, starts)
    assert out.shape == q.shape and out.dtype == dtype
    check_close(out, q, k, v, lengths, block_mask, starts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("D", "T", "Hq"), [(256, 9, 4), (256, 1, 8), (64, 81, 8), (128, 1, 4), (128, 5, 8), (80, 25, 4)])
def test_gpu_tiles_through_the_interpreter(monkeypatch, dtype, D, T, Hq):
    """The tile sizes a GPU launch picks (every branch of `_block_sizes`), run by the interpreter: the CPU
    tests otherwise see only the interpreter's own tiles."""
    monkeypatch.setenv("MTP_KERNELS", "interpret")
    gpu_tiles = tree_attention_module._block_sizes
    monkeypatch.setattr(tree_attention_module, "_block_sizes", lambda rows, d, on_cuda, wide: gpu_tiles(rows, d, True, wide))
    q, k, v, lengths, starts = random_inputs(2, Hq, 2, T, D, T + 70, dtype, seed=D * T)
    block_mask = quadratic_mask(8) if T == 81 else torch.ones(T, T, dtype=torch.bool).tril()
    check_close(mtp_kernels.tree_attention(q, k, v, lengths, block_mask, None, starts), q, k, v, lengths, block_mask,
                starts)


@pytest.mark.parametrize("group", [1, 4, 8])
def test_grouped_query_heads(kernel_mode, group):
    q, k, v, lengths, _ = random_inputs(2, 2 * group, 2, 9, 64, 30, torch.float32, seed=group)
    out = mtp_kernels.tree_attention(q, k, v, lengths, quadratic_mask(2))
    check_close(out, q, k, v, lengths, quadratic_mask(2), None)


def test_query_that_sees_nothing_gives_zeros(kernel_mode):
    q, k, v, _, _ = random_inputs(2, 2, 1, 4, 64, 12, torch.float32, seed=0)
    lengths = torch.tensor([0, 3])
    starts = torch.tensor([0, 3])  # row 1's prefix is all padding
    block_mask = torch.eye(4, dtype=torch.bool)
    block_mask[2, 2] = False
    out = mtp_kernels.tree_attention(q, k, v, lengths, block_mask, None, starts)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    check_close(out, q, k, v, lengths, block_mask, starts)


@pytest.mark.parametrize("T", [1, 9])
def test_prefix_split_across_programs(monkeypatch, T):
    """Flash-decoding: few programs and a long cache split the prefix; each split's partial softmax state
    is merged. Rows whose prefix ends in the first split (later splits see nothing), whose padding covers
    whole splits, and one that sees nothing at all."""
    monkeypatch.setenv("MTP_KERNELS", "interpret")
    monkeypatch.setattr(tree_attention_module, "_SPLIT_MIN_SLOTS", 64)
    S = 300
    assert tree_attention_module._split_plan(2, S, 64)[0] > 1
    q, k, v, _, _ = random_inputs(4, 4, 2, T, 64, S, torch.float32, seed=T)
    lengths = torch.tensor([S - T, 40, 250, 0])
    starts = torch.tensor([0, 3, 190, 0])
    block_mask = quadratic_mask(2) if T == 9 else torch.ones(1, 1, dtype=torch.bool)
    if T == 1:
        starts[3] = 1  # row 3's only key (its own block entry) is padding: it sees nothing
    out = mtp_kernels.tree_attention(q, k, v, lengths, block_mask, None, starts)
    check_close(out, q, k, v, lengths, block_mask, starts)
    if T == 1:
        assert torch.equal(out[3], torch.zeros_like(out[3]))


def test_inputs_in_any_layout(kernel_mode):
    """A transposed block mask and lengths / starts that are columns of a table: the kernel must read
    their values, not assume contiguous memory."""
    q, k, v, lengths, starts = random_inputs(3, 4, 2, 9, 32, 40, torch.float32, seed=21)
    block_mask = (torch.rand(9, 9, generator=torch.Generator().manual_seed(21)) > 0.4).t()
    table = torch.stack([lengths, starts], dim=1)
    out = mtp_kernels.tree_attention(q, k, v, table[:, 0], block_mask, None, table[:, 1])
    check_close(out, q, k, v, lengths, block_mask.contiguous(), starts)


def test_float64_is_computed_in_float64(kernel_mode):
    q, k, v, lengths, starts = random_inputs(2, 4, 2, 5, 32, 30, torch.float64, seed=22)
    block_mask = torch.ones(5, 5, dtype=torch.bool).tril()
    out = mtp_kernels.tree_attention(q, k, v, lengths, block_mask, None, starts)
    exact = reference.tree_attention(q, k, v, lengths, block_mask, None, starts)
    torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("empty", ["batch", "queries", "heads"])
def test_empty_inputs_give_empty_outputs(kernel_mode, empty):
    B, Hq, T = {"batch": (0, 4, 3), "queries": (2, 4, 0), "heads": (2, 0, 3)}[empty]
    q = torch.randn(B, Hq, T, 16)
    kv = torch.randn(B, 2, 12, 16)
    out = mtp_kernels.tree_attention(q, kv, kv, torch.zeros(B, dtype=torch.long), torch.ones(T, T, dtype=torch.bool))
    assert out.shape == q.shape


def test_split_plan():
    plan = tree_attention_module._split_plan
    assert plan(8, 32768, 64) == (32, 1024)  # Llama-3-8B decoding at batch 1: 8 programs, a 32k cache
    assert plan(256, 32768, 64)[0] == 1  # enough programs already
    assert plan(8, 600, 64)[0] == 1  # too short to be worth a merge
    splits, size = plan(48, 5500, 64)
    assert size % 64 == 0 and (splits - 1) * size < 5500 <= splits * size


def test_cpu_path_rebuilds_its_mask_when_the_inputs_change(monkeypatch):
    """The CPU path builds the visibility mask once for all layers of a forward; lengths advanced in place
    by kv_compact (a compiled op: no version bump), other lengths, another block mask or another dtype each
    need a fresh one."""
    monkeypatch.setenv("MTP_KERNELS", "torch")
    q, k, v, lengths, starts = random_inputs(2, 4, 2, 9, 64, 40, torch.float32, seed=5)
    lengths = torch.tensor([3, 20])
    block_mask = quadratic_mask(2)
    for _ in range(2):  # the second call reuses the mask
        check_close(mtp_kernels.tree_attention(q, k, v, lengths, block_mask, None, starts), q, k, v, lengths,
                    block_mask, starts)
    mtp_kernels.kv_compact([k, v], lengths, torch.tensor([[0, 2, 4, -1], [1, -1, -1, -1]]), 9)
    assert lengths.tolist() == [6, 21]
    check_close(mtp_kernels.tree_attention(q, k, v, lengths, block_mask, None, starts), q, k, v, lengths,
                block_mask, starts)
    other_lengths = torch.tensor([0, 25])
    check_close(mtp_kernels.tree_attention(q, k, v, other_lengths, block_mask, None, starts), q, k, v,
                other_lengths, block_mask, starts)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    check_close(mtp_kernels.tree_attention(q, k, v, other_lengths, causal, None, starts), q, k, v, other_lengths,
                causal, starts)
    wide = [t.double() for t in (q, k, v)]  # the mask is kept in SDPA's dtype: fp64 needs its own
    check_close(mtp_kernels.tree_attention(*wide, other_lengths, causal, None, starts), *wide, other_lengths, causal,
                starts)


def test_cpu_path_is_sdpa_with_the_bool_mask(monkeypatch):
    """The CPU path hands SDPA the additive mask SDPA itself would make of the bool one: same bits."""
    monkeypatch.setenv("MTP_KERNELS", "torch")
    q, k, v, lengths, starts = random_inputs(2, 4, 2, 16, 64, 60, torch.float32, seed=7)
    block_mask = quadratic_mask(3)
    live = int(lengths.max()) + 16
    allowed = reference.tree_attention_allowed(lengths, block_mask, live, starts)[:, None]
    expected = F.scaled_dot_product_attention(q, k[:, :, :live], v[:, :, :live], attn_mask=allowed, enable_gqa=True)
    assert torch.equal(mtp_kernels.tree_attention(q, k, v, lengths, block_mask, None, starts), expected)


def test_reference_matches_sdpa_with_a_materialised_mask():
    q, k, v, lengths, starts = random_inputs(3, 8, 2, 16, 64, 40, torch.float32, seed=3)
    block_mask = quadratic_mask(3)
    expected = sdpa_same_dtype(q, k, v, lengths, block_mask, starts)
    torch.testing.assert_close(reference.tree_attention(q, k, v, lengths, block_mask, None, starts), expected)


def test_quadratic_mask_rule():
    k = 2
    layout = step_layout(k, k, "quadratic", torch.device("cpu"))
    mask = layout.block_mask
    groups, numbers = layout.anchor_of.tolist(), layout.mask_number.tolist()
    assert sorted(zip(groups, numbers)) == [(g, r) for g in range(k + 1) for r in range(k + 1)]
    for query in range((k + 1) ** 2):
        for key in range((k + 1) ** 2):
            (g1, r1), (g2, r2) = (groups[query], numbers[query]), (groups[key], numbers[key])
            rule = (r2 == 0 and g2 <= g1) or (g2 == g1 and 0 < r2 <= r1)
            assert bool(mask[query, key]) == rule, (query, key)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"q": torch.zeros(2, 3, 4, 64), "k": torch.zeros(2, 2, 12, 64), "v": torch.zeros(2, 2, 12, 64)}, "multiple"),
        ({"k": torch.zeros(2, 1, 12, 32), "v": torch.zeros(2, 1, 12, 32)}, "head dim"),
        ({"v": torch.zeros(2, 1, 12, 64, dtype=torch.float16)}, "dtype"),
        ({"block_mask": torch.ones(3, 3, dtype=torch.bool)}, "block_mask"),
        ({"block_mask": torch.ones(4, 4)}, "block_mask"),
        ({"lengths": torch.tensor([0])}, "lengths"),
        ({"lengths": torch.tensor([0, 9])}, "exceeds"),
        ({"starts": torch.tensor([0.0, 1.0])}, "starts"),
        ({"lengths": torch.tensor([-1, 3])}, "negative"),
        ({"starts": torch.tensor([0, -2])}, "negative"),
        ({"k": torch.zeros(2, 0, 12, 64), "v": torch.zeros(2, 0, 12, 64)}, "KV heads"),
    ],
)
def test_bad_input(change, message):
    inputs = dict(
        q=torch.zeros(2, 2, 4, 64), k=torch.zeros(2, 1, 12, 64), v=torch.zeros(2, 1, 12, 64),
        lengths=torch.tensor([0, 3]), block_mask=torch.ones(4, 4, dtype=torch.bool), starts=None,
    )
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        mtp_kernels.tree_attention(inputs["q"], inputs["k"], inputs["v"], inputs["lengths"], inputs["block_mask"],
                                   None, inputs["starts"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("D", "T", "S"), [(64, 81, 700), (128, 1, 2100), (64, 9, 5000), (128, 16, 300), (80, 25, 130), (256, 9, 90)])
def test_compiled_kernel_on_gpu(dtype, D, T, S):
    q, k, v, lengths, starts = random_inputs(4, 32, 8, T, D, S, dtype, seed=T, device="cuda")
    block_mask = quadratic_mask(8).cuda() if T == 81 else torch.ones(T, T, dtype=torch.bool, device="cuda").tril()
    out = mtp_kernels.tree_attention(q, k, v, lengths, block_mask, None, starts)
    check_close(out, q, k, v, lengths, block_mask, starts)
