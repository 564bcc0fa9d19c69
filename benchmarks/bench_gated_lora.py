"""gated_lora_linear against peft's LoRA forward and plain nn.Linear.

Shapes: Llama-3-8B projections (4096->4096, 4096->1024, 4096->14336, 14336->4096), 1 to 4096 rows of which
8 in 9 are gated (a k=8 verify step has 72 mask rows of 81), rank 16 and 128, bf16 on a GPU. Targets on
H100/H200: at most 1.10x the plain linear's time up to 648 rows at r=16, faster than peft everywhere.
The gated op's extra_info holds `vs_linear` and `vs_peft`: its median time over each baseline's, all three
timed back to back in the same test; the targets are asserted when the benchmark times on a GPU.
"""

import itertools

import pytest
import torch
from common import DEVICE, DTYPE, check_target, grid, median_seconds, run

import mtp_kernels

SHAPES = grid([(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)], [(64, 48)])
ROWS = grid([1, 16, 81, 648, 4096], [1, 81])
RANKS = grid([16, 128], [8])
GRID = pytest.mark.parametrize(("shape", "rows", "rank"), list(itertools.product(SHAPES, ROWS, RANKS)))


def layer_inputs(shape, rows, rank):
    in_features, out_features = shape
    generator = torch.Generator().manual_seed(rows)
    linear = torch.nn.Linear(in_features, out_features, bias=False).to(DEVICE, DTYPE)
    x = torch.randn(rows, in_features, generator=generator).to(DEVICE, DTYPE)
    a = (torch.randn(rank, in_features, generator=generator) / in_features**0.5).to(DEVICE, DTYPE)
    b = (torch.randn(out_features, rank, generator=generator) / rank**0.5).to(DEVICE, DTYPE)
    gate = torch.arange(rows, device=DEVICE) % 9 != 0 if rows > 1 else torch.ones(1, dtype=torch.bool, device=DEVICE)
    return linear, x, a, b, gate


def peft_layer(linear, a, b):
    """peft's LoRA Linear around `linear` with A = a, B = b and scaling 2, built through get_peft_model."""
    from peft import LoraConfig, get_peft_model

    rank = a.shape[0]
    holder = torch.nn.Module()
    holder.proj = linear
    peft_model = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]))
    layer = peft_model.base_model.model.proj.to(DEVICE, DTYPE)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return layer


def group(shape, rows, rank):
    return f"lora {shape[0]}->{shape[1]} rows={rows} r={rank}"


@GRID
def test_gated_lora(benchmark, shape, rows, rank):
    linear, x, a, b, gate = layer_inputs(shape, rows, rank)
    peft = peft_layer(linear, a, b)
    benchmark.group = group(shape, rows, rank)
    with torch.no_grad():
        run(benchmark, mtp_kernels.gated_lora_linear, x, linear.weight, None, a, b, 2.0, gate)
        ours = median_seconds(mtp_kernels.gated_lora_linear, x, linear.weight, None, a, b, 2.0, gate)
        vs_linear, vs_peft = ours / median_seconds(linear, x), ours / median_seconds(peft, x)
    benchmark.extra_info.update(in_features=shape[0], out_features=shape[1], rows=rows, gated_rows=int(gate.sum()),
                                rank=rank, vs_linear=vs_linear)
    check_target(benchmark, "vs_peft", vs_peft, 1.0)
    if rank == 16 and rows <= 648:
        check_target(benchmark, "vs_linear", vs_linear, 1.10)


@GRID
def test_peft_lora(benchmark, shape, rows, rank):
    linear, x, a, b, _ = layer_inputs(shape, rows, rank)
    layer = peft_layer(linear, a, b)
    benchmark.group = group(shape, rows, rank)
    with torch.no_grad():
        run(benchmark, layer, x)


@GRID
def test_plain_linear(benchmark, shape, rows, rank):
    linear, x, _, _, _ = layer_inputs(shape, rows, rank)
    benchmark.group = group(shape, rows, rank)
    with torch.no_grad():
        run(benchmark, linear, x)
