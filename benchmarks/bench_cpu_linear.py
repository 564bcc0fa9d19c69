"""prepacked_linear (oneDNN on a weight packed once) against F.linear (MKL) on the CPU, fp32, inference,
and the ways the gated LoRA op's CPU path runs a decoding step's LoRA projection on packed weights.

Shapes: the demo model's projections (256->768, 768->256) and LM head (256->4096), and a Llama-3-8B
projection (4096->4096); rows 1 (plain decoding), 5, 25 and 81 (a verify step at 4 and 8 masks). The
prepacked test's extra_info holds `vs_f_linear`: F.linear's median time over its own, timed back to back in
the same test. The gated-LoRA pair times a step's LoRA projection added (three more small ops) against
merged into the weight (one product twice as wide), at 15-81 rows; the q/k/v pair a layer's three merged
products against one grouped product. Numbers: benchmarks/results/README.md ("CPU GEMMs").
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from common import median_seconds, run

from mtp_kernels import cpu_linear
from mtp_kernels.cpu_linear import prepacked_linear

pytestmark = pytest.mark.skipif(not cpu_linear.onednn_available(), reason="this torch build has no oneDNN")

SHAPES = [(256, 768), (768, 256), (256, 4096), (4096, 4096)]
ROWS = [1, 5, 25, 81]
CASES = list(itertools.product(SHAPES, ROWS))
GRID = pytest.mark.parametrize(("shape", "rows"), CASES, ids=[f"{i}to{o}-{r}rows" for (i, o), r in CASES])


def inputs(shape, rows):
    in_features, out_features = shape
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=generator)
    return x, torch.randn(out_features, in_features, generator=generator)


@GRID
def test_f_linear(benchmark, shape, rows):
    x, weight = inputs(shape, rows)
    benchmark.group = f"{shape[0]}->{shape[1]}, {rows} rows"
    with torch.no_grad():
        run(benchmark, F.linear, x, weight)


@GRID
def test_prepacked_linear(benchmark, shape, rows):
    x, weight = inputs(shape, rows)
    benchmark.group = f"{shape[0]}->{shape[1]}, {rows} rows"
    with torch.no_grad():
        torch.testing.assert_close(prepacked_linear(x, weight), F.linear(x, weight), rtol=1e-4, atol=1e-3)
        run(benchmark, prepacked_linear, x, weight)
        if not benchmark.disabled:
            baseline = median_seconds(F.linear, x, weight, repeats=50)
            benchmark.extra_info["vs_f_linear"] = baseline / median_seconds(prepacked_linear, x, weight, repeats=50)


# A decoding step's gated LoRA linear (rank 32, LoRA on the rows from `gated_from` on), the two ways the
# op's CPU path can run it (`cpu_linear.gated_lora_on_packed`): one product against the weight stacked over
# the LoRA's A, then the B product on the gated rows, or one product against the weight paired with its LoRA-merged copy. Rows: 7 masks linear (15),
# 4 and 5 masks quadratic (25, 36), 8 quadratic (81); `merged_lora_applies` takes the merged way up to 32.
LORA_SHAPES = [(256, 256), (256, 768), (768, 256)]
LORA_STEPS = [(15, 8), (25, 5), (36, 6), (81, 9)]  # (rows, gated_from)
LORA_CASES = list(itertools.product(LORA_SHAPES, LORA_STEPS))
LORA_GRID = pytest.mark.parametrize(("shape", "step"), LORA_CASES,
                                    ids=[f"{i}to{o}-{r}rows" for (i, o), (r, _) in LORA_CASES])


def lora_inputs(shape, step):
    """x [rows, in], the gate [rows] (a step's masks last) and the member (weight, None, A, B, 2.0)."""
    (rows, gated_from), (in_features, out_features) = step, shape
    x, weight = inputs(shape, rows)
    generator = torch.Generator().manual_seed(in_features + out_features)
    lora_a = torch.randn(32, in_features, generator=generator) / in_features**0.5
    lora_b = torch.randn(out_features, 32, generator=generator) / 32**0.5
    return x, torch.arange(rows) >= gated_from, (weight, None, lora_a, lora_b, 2.0)


def gated_lora(x, member, gate, merge):
    return cpu_linear.gated_lora_on_packed(x, [member], gate, merge)


@LORA_GRID
@pytest.mark.parametrize("merge", [False, True], ids=["added", "merged"])
def test_gated_lora(benchmark, shape, step, merge):
    x, gate, member = lora_inputs(shape, step)
    benchmark.group = f"gated LoRA {shape[0]}->{shape[1]}, {step[0]} rows"
    with torch.no_grad():
        torch.testing.assert_close(gated_lora(x, member, gate, merge), gated_lora(x, member, gate, not merge),
                                   rtol=1e-4, atol=1e-3)
        run(benchmark, gated_lora, x, member, gate, merge)


# A layer's q, k and v (the demo model's 256 -> 256, 128, 128, rank 32) over a 7-masks-linear step's 15 rows:
# three merged products against one grouped product, which pays a oneDNN call's fixed cost once.
QKV_OUT_FEATURES = (256, 128, 128)


def qkv_members():
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(out, 256, generator=generator) / 16, None, torch.randn(32, 256, generator=generator) / 16,
             torch.randn(out, 32, generator=generator) / 32**0.5, 2.0) for out in QKV_OUT_FEATURES]


def qkv_one_by_one(x, members, gate):
    return torch.cat([gated_lora(x, member, gate, merge=True) for member in members], dim=-1)


def qkv_grouped(x, members, gate):
    return cpu_linear.gated_lora_on_packed(x, members, gate, merge=True)


@pytest.mark.parametrize("grouped", [False, True], ids=["three-products", "one-grouped-product"])
def test_qkv_merged(benchmark, grouped):
    x, members = torch.randn(1, 15, 256, generator=torch.Generator().manual_seed(6)), qkv_members()
    gate = (torch.arange(15) >= 8)[None]
    benchmark.group = "q, k, v with merged LoRA, 256 -> 256 + 128 + 128, 15 rows"
    product = qkv_grouped if grouped else qkv_one_by_one
    with torch.no_grad():
        torch.testing.assert_close(product(x, members, gate), qkv_one_by_one(x, members, gate), rtol=1e-5, atol=1e-5)
        run(benchmark, product, x, members, gate)
