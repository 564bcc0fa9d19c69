"""prepacked_linear (oneDNN on a weight packed once) against F.linear (MKL) on the CPU, fp32, inference.

Shapes: the demo model's projections (256->768, 768->256) and LM head (256->4096), and a Llama-3-8B
projection (4096->4096); rows 1 (plain decoding), 5, 25 and 81 (a verify step at 4 and 8 masks). On the
project's 2-core EPYC, one thread: 25 x 256->768 takes 52 us prepacked against 107 us, 81 rows 134 against
299; one row is faster through F.linear (11 against 18 us), which is why only MTP's forwards pack.
The prepacked test's extra_info holds `vs_f_linear`: F.linear's median time over its own, timed back to
back in the same test.
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
