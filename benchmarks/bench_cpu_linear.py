"""prepacked_linear (oneDNN on a weight packed once) against F.linear (MKL) on the CPU, fp32, inference.

Shapes: the demo model's projections (256->768, 768->256) and LM head (256->4096), and a Llama-3-8B
projection (4096->4096); rows 1 (plain decoding), 5, 25 and 81 (a verify step at 4 and 8 masks). On the
project's 2-core EPYC, one thread: 25 x 256->768 takes 52 us prepacked against 107 us, 81 rows 134 against
299; one row is faster through F.linear (11 against 18 us), which is why only MTP's forwards pack.
The prepacked test's extra_info holds `vs_f_linear`: F.linear's median time over its own, timed back to
back in the same test. The gated-LoRA pair times a decoding step's LoRA projection added (three more small
ops) against merged into the weight (one product twice as wide), at 15-81 rows. Alone in this hot loop
the merged one is slower except at 256->256 x 15 rows (34 against 32 us; 47 against 55 at 256->768);
inside a decoding step it is the faster one up to 32 rows (`mtp_kernels/cpu_linear.py` has the A/B). The
q/k/v pair times a layer's three merged products against one grouped product.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from common import median_seconds, run

from mtp_kernels import cpu_linear, reference
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
# prepacked CPU path can run it: the base product plus the LoRA's own products, or one product against the
# weight paired with its LoRA-merged copy. Rows: 7 masks linear (15), 4 and 5 masks quadratic (25, 36),
# 8 quadratic (81); `merged_lora_applies` takes the merged way up to 32 rows.
LORA_SHAPES = [(256, 256), (256, 768), (768, 256)]
LORA_STEPS = [(15, 8), (25, 5), (36, 6), (81, 9)]  # (rows, gated_from)
LORA_CASES = list(itertools.product(LORA_SHAPES, LORA_STEPS))
LORA_GRID = pytest.mark.parametrize(("shape", "step"), LORA_CASES,
                                    ids=[f"{i}to{o}-{r}rows" for (i, o), (r, _) in LORA_CASES])


def lora_inputs(shape, step):
    (rows, gated_from), (in_features, out_features) = step, shape
    x, weight = inputs(shape, rows)
    generator = torch.Generator().manual_seed(in_features + out_features)
    lora_a = torch.randn(32, in_features, generator=generator) / in_features**0.5
    lora_b = torch.randn(out_features, 32, generator=generator) / 32**0.5
    row_mask = (torch.arange(rows) >= gated_from).float()[:, None]
    return x, weight, lora_a, lora_b, gated_from, row_mask


def lora_added(x, weight, lora_a, lora_b, row_mask):
    return reference.add_masked_lora(cpu_linear.linear_on_packed(x, weight), x, lora_a, lora_b, 2.0, row_mask)


@LORA_GRID
def test_gated_lora_added(benchmark, shape, step):
    x, weight, lora_a, lora_b, _, row_mask = lora_inputs(shape, step)
    benchmark.group = f"gated LoRA {shape[0]}->{shape[1]}, {step[0]} rows"
    with torch.no_grad():
        run(benchmark, lora_added, x, weight, lora_a, lora_b, row_mask)


@LORA_GRID
def test_gated_lora_merged(benchmark, shape, step):
    x, weight, lora_a, lora_b, gated_from, row_mask = lora_inputs(shape, step)
    benchmark.group = f"gated LoRA {shape[0]}->{shape[1]}, {step[0]} rows"
    merged = cpu_linear.gated_lora_on_packed
    with torch.no_grad():
        torch.testing.assert_close(merged(x, weight, None, lora_a, lora_b, 2.0, gated_from),
                                   lora_added(x, weight, lora_a, lora_b, row_mask), rtol=1e-4, atol=1e-3)
        run(benchmark, merged, x, weight, None, lora_a, lora_b, 2.0, gated_from)


# A layer's q, k and v (the demo model's 256 -> 256, 128, 128, rank 32) over a 7-masks-linear step's 15 rows:
# three merged products against one grouped product (`gated_lora_group_on_packed`), which pays a oneDNN
# call's fixed cost (~10 us here) once instead of three times: 40 against 73 us on the project's 2-core EPYC.
QKV_OUT_FEATURES = (256, 128, 128)


def qkv_members():
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(out, 256, generator=generator) / 16, None, torch.randn(32, 256, generator=generator) / 16,
             torch.randn(out, 32, generator=generator) / 32**0.5, 2.0) for out in QKV_OUT_FEATURES]


def qkv_one_by_one(x, members, gated_from):
    return [cpu_linear.gated_lora_on_packed(x, *member, gated_from) for member in members]


@pytest.mark.parametrize("grouped", [False, True], ids=["three-products", "one-grouped-product"])
def test_qkv_merged(benchmark, grouped):
    x, members, gated_from = torch.randn(1, 15, 256, generator=torch.Generator().manual_seed(6)), qkv_members(), 8
    benchmark.group = "q, k, v with merged LoRA, 256 -> 256 + 128 + 128, 15 rows"
    product = cpu_linear.gated_lora_group_on_packed if grouped else qkv_one_by_one
    with torch.no_grad():
        for got, want in zip(product(x, members, gated_from), qkv_one_by_one(x, members, gated_from)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        run(benchmark, product, x, members, gated_from)
