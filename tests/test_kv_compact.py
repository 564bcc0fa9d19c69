"""kv_compact against a gather reference: the compiled extension (CPU, and CUDA when present) and the torch path."""

import pytest
import torch

import mtp_kernels
from mtp_kernels import backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_case(batch=3, heads=2, slots=40, head_dim=24, block=9, layers=3, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    caches = [torch.randn(batch, heads, slots, head_dim, generator=generator).to(dtype).to(device) for _ in range(2 * layers)]
    lengths = torch.randint(0, slots - block + 1, (batch,), generator=generator)
    keep = torch.full((batch, block), -1, dtype=torch.long)
    for b in range(batch):
        count = int(torch.randint(0, block + 1, (1,), generator=generator))
        keep[b, :count] = torch.randperm(block, generator=generator)[:count].sort().values
    return caches, lengths.to(device), keep.to(device), block


def gather_reference(caches, lengths, keep):
    """Expected caches built out of place: row b's first lengths[b] slots, then its kept block entries."""
    expected = [cache.clone() for cache in caches]
    for b in range(keep.shape[0]):
        kept = keep[b][keep[b] >= 0]
        start = int(lengths[b])
        for source, target in zip(caches, expected):
            target[b, :, start : start + kept.numel()] = source[b, :, start + kept]
    return expected, lengths + (keep >= 0).sum(1)


@pytest.fixture(params=["extension", "torch"])
def compact_path(request, monkeypatch):
    if request.param == "extension" and not backend.has_extension():
        pytest.skip("compiled extension not built")
    monkeypatch.setenv("MTP_KERNELS", "auto" if request.param == "extension" else "torch")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_matches_gather_reference(compact_path, dtype, seed):
    caches, lengths, keep, block = random_case(dtype=dtype, seed=seed)
    expected, expected_lengths = gather_reference(caches, lengths, keep)
    mtp_kernels.kv_compact(caches, lengths, keep, block)
    assert torch.equal(lengths, expected_lengths)
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)  # a copy: bit-exact


def test_overlapping_moves_and_noop_rows(compact_path):
    caches = [torch.arange(2 * 1 * 12 * 2, dtype=torch.float32).reshape(2, 1, 12, 2)]
    lengths = torch.tensor([2, 0])
    keep = torch.tensor([[1, 2, 4, -1], [0, 1, 2, 3]])  # row 0 shifts left onto its own sources
    expected, _ = gather_reference(caches, lengths, keep)
    mtp_kernels.kv_compact(caches, lengths, keep, 6)
    assert torch.equal(caches[0], expected[0])
    assert lengths.tolist() == [5, 4]


def test_quadratic_step_keeps_anchor_and_accepted_drafts(compact_path):
    k, accepted = 3, 2
    block = (k + 1) ** 2
    cache = torch.randn(1, 2, 30, 8)
    lengths = torch.tensor([5])
    keep = torch.tensor([[g * (k + 1) if g <= accepted else -1 for g in range(k + 1)]])
    before = cache.clone()
    mtp_kernels.kv_compact([cache], lengths, keep, block)
    for g in range(accepted + 1):
        assert torch.equal(cache[0, :, 5 + g], before[0, :, 5 + g * (k + 1)])
    assert torch.equal(cache[0, :, :5], before[0, :, :5])
    assert lengths.tolist() == [5 + accepted + 1]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c, l, k: (c, l, k.fill_(-1).index_fill_(1, torch.tensor([0]), 9)), "outside the block"),
        (lambda c, l, k: (c, l, torch.tensor([[2, 1, -1, -1, -1, -1, -1, -1, -1]] * 3)), "strictly increasing"),
        (lambda c, l, k: (c, l, torch.tensor([[0, -1, 3, -1, -1, -1, -1, -1, -1]] * 3)), "padding"),
        (lambda c, l, k: (c, l.fill_(35), k), "exceeds the cache"),
        (lambda c, l, k: (c + [torch.zeros(3, 2, 41, 24)], l, k), "shape"),
        (lambda c, l, k: (c + [torch.zeros(3, 2, 40, 24, dtype=torch.float16)], l, k), "dtype"),
        (lambda c, l, k: (c, l.int(), k), "lengths"),
        (lambda c, l, k: (c, l, k[:2]), "rows|keep"),
        (lambda c, l, k: ([], l, k), "empty"),
        (lambda c, l, k: (c + [c[2]], l, k), r"caches\[6\] is the memory of caches\[2\]"),
        (lambda c, l, k: (c + [c[0][:, :1].expand(3, 2, 40, 24)], l, k), "expanded"),
    ],
)
def test_bad_input_raises_before_writing(compact_path, mutate, message):
    caches, lengths, keep, block = random_case()
    caches, lengths, keep = mutate(caches, lengths, keep)
    snapshot = [c.clone() for c in caches]
    with pytest.raises(ValueError, match=message):
        mtp_kernels.kv_compact(caches, lengths, keep, block)
    assert all(torch.equal(a, b) for a, b in zip(caches, snapshot))


@pytest.mark.skipif(not backend.has_extension(), reason="compiled extension not built")
def test_torch_compile_traces_the_op():
    caches, lengths, keep, block = random_case(seed=5)
    expected, expected_lengths = gather_reference(caches, lengths, keep)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(caches, lengths, keep):
        torch.ops.mtp_kernels.kv_compact(caches, lengths, keep, block)
        return lengths * 1

    assert torch.equal(step(caches, lengths, keep), expected_lengths)
    assert all(torch.equal(a, b) for a, b in zip(caches, expected))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    caches, lengths, keep, block = random_case(batch=5, heads=4, slots=300, head_dim=128, block=81, dtype=dtype, seed=9)
    expected, expected_lengths = gather_reference(caches, lengths, keep)
    on_gpu = [c.cuda() for c in caches]
    gpu_lengths = lengths.cuda()
    mtp_kernels.kv_compact(on_gpu, gpu_lengths, keep.cuda(), block)
    assert torch.equal(gpu_lengths.cpu(), expected_lengths)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(on_gpu, expected))
