"""kv_compact (one call for every layer's K and V) against a per-layer torch loop, with GB/s.

Shapes: Llama-3-8B (32 layers, 8 KV heads, D=128, K and V: 64 caches), batch 1, 8, 32, prefix 512 to 32k,
a k=8 quadratic block (T=81) keeping 1 to 9 entries. GB/s counts bytes read plus bytes written by the
moves; `copy_GBps` in extra_info is the device's plain tensor-copy bandwidth for comparison. Target on
H100/H200: at least 70% of the copy bandwidth (`copy_share`), asserted when the benchmark times on a GPU.
"""

import itertools

import pytest
import torch
from common import DEVICE, DTYPE, ON_GPU, check_target, grid, run

import mtp_kernels

LAYERS, HEADS, HEAD_DIM = grid((32, 8, 128), (4, 2, 64))
BATCHES = grid([1, 8, 32], [2])
PREFIXES = grid([512, 4096, 32768], [64])
KEPT = grid([1, 5, 9], [3])
T = 81 if ON_GPU else 9


GRID = pytest.mark.parametrize(("batch", "prefix", "kept"), list(itertools.product(BATCHES, PREFIXES, KEPT)))

def make(batch, prefix, kept):
    if ON_GPU and batch * (prefix + T) * LAYERS * 2 * HEADS * HEAD_DIM * 2 > 40e9:
        pytest.skip("over the GPU memory budget of one benchmark")
    caches = [torch.randn(batch, HEADS, prefix + T, HEAD_DIM, device=DEVICE, dtype=DTYPE) for _ in range(2 * LAYERS)]
    k = round(T**0.5) - 1
    keep = torch.tensor([[g * (k + 1) if g < kept else -1 for g in range(k + 1)]] * batch, device=DEVICE)
    lengths = torch.full((batch,), prefix, device=DEVICE)
    moved_bytes = 2 * len(caches) * batch * HEADS * (kept - 1) * HEAD_DIM * caches[0].element_size()
    return caches, lengths, keep, moved_bytes


def torch_loop(caches, lengths, keep):
    """What one would write without the op: index per layer, one gather and one scatter each."""
    kept = keep.clamp(min=0)
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None]
    source, target = lengths[:, None] + kept, lengths[:, None] + torch.arange(keep.shape[1], device=keep.device)
    valid = keep >= 0
    for cache in caches:
        moved = cache[rows, :, source]  # [B, K, H, D]
        cache[rows.expand_as(target)[valid], :, target[valid]] = moved[valid]


def copy_bandwidth(caches):
    """GB/s of a plain device copy of one cache, for reference."""
    src = caches[0]
    dst = torch.empty_like(src)
    if ON_GPU:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / 10
    else:
        import time

        begin = time.perf_counter()
        dst.copy_(src)
        seconds = time.perf_counter() - begin
    return 2 * src.numel() * src.element_size() / seconds / 1e9


@GRID
def test_kv_compact(benchmark, batch, prefix, kept):
    caches, lengths, keep, moved_bytes = make(batch, prefix, kept)
    benchmark.group = f"kv_compact B={batch} prefix={prefix} kept={kept}"

    def step():
        mtp_kernels.kv_compact(caches, lengths.clone(), keep, T)

    result = run(benchmark, step)
    if benchmark.stats:
        benchmark.extra_info["GBps"] = moved_bytes / benchmark.stats.stats.min / 1e9
        benchmark.extra_info["copy_GBps"] = copy_bandwidth(caches)
        check_target(benchmark, "copy_share", benchmark.extra_info["GBps"] / benchmark.extra_info["copy_GBps"], 0.70,
                     higher_is_better=True)
    return result


@GRID
def test_torch_loop(benchmark, batch, prefix, kept):
    caches, lengths, keep, moved_bytes = make(batch, prefix, kept)
    benchmark.group = f"kv_compact B={batch} prefix={prefix} kept={kept}"
    run(benchmark, torch_loop, caches, lengths, keep)
    if benchmark.stats:
        benchmark.extra_info["GBps"] = moved_bytes / benchmark.stats.stats.min / 1e9
