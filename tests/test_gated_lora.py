"""gated_lora_linear and GatedLoRALinear: exact base rows, LoRA rows vs float64, gradients, bad input."""

import pytest
import reference
import torch
import torch.nn.functional as F

import mtp_kernels
from mtp_kernels import cpu_linear
from mtp_kernels import gated_lora as gated_lora_module
from mtp_kernels.gated_lora import _plan
from mtp_model.modules import GateContext, GatedLoRALinear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(rows, in_features, out_features, rank, dtype, gated="random", bias=True, seed=0, lead=()):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) / shape[-1] ** 0.5).to(dtype)

    x = rand(*lead, rows, in_features) * in_features**0.5
    gate = {
        "random": torch.rand(*lead, rows, generator=generator) < 0.7,
        "none": torch.zeros(*lead, rows, dtype=torch.bool),
        "all": torch.ones(*lead, rows, dtype=torch.bool),
    }[gated]
    bias = rand(out_features) if bias else None
    return x, rand(out_features, in_features), bias, rand(rank, in_features), rand(out_features, rank), gate


def assert_lora_rows_close(out, x, weight, bias, a, b, scaling, gate):
    """Error vs float64 within twice the rounding error of the plain base product in x's dtype (the
    baseline: what any implementation in that dtype pays), plus one unit of rounding at the output's scale."""
    wide = [t.double() if t is not None else None for t in (x, weight, bias, a, b)]
    exact = reference.gated_lora_linear(*wide, scaling, gate)
    baseline = (F.linear(x, weight, bias).double() - F.linear(*wide[:3])).abs().max().item()
    budget = 2 * baseline + torch.finfo(x.dtype).eps * max(exact.abs().max().item(), 1.0)
    assert (out.double() - exact).abs().max().item() <= budget


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows", "in_f", "out_f", "rank"),
    [(37, 70, 50, 5), (1, 33, 17, 1), (81, 64, 96, 16), (3, 600, 24, 8), (20, 300, 40, 256)],
)
@pytest.mark.parametrize("gated", ["random", "none", "all"])
def test_forward(kernel_mode, dtype, rows, in_f, out_f, rank, gated):
    x, weight, bias, a, b, gate = make(rows, in_f, out_f, rank, dtype, gated, seed=rows + rank)
    out = mtp_kernels.gated_lora_linear(x, weight, bias, a, b, 2.0, gate)
    base = F.linear(x, weight, bias)
    assert out.dtype == dtype and out.shape == base.shape
    assert torch.equal(out[~gate], base[~gate])  # ungated rows: bit-identical to the plain layer
    assert_lora_rows_close(out, x, weight, bias, a, b, 2.0, gate)


@pytest.mark.parametrize(("in_f", "out_f", "rank"), [(6, 5, 0), (0, 5, 3), (6, 0, 3)])
def test_degenerate_shapes_are_the_plain_linear(kernel_mode, in_f, out_f, rank):
    x, weight, bias = torch.randn(4, in_f), torch.randn(out_f, in_f), torch.randn(out_f)
    gate = torch.tensor([True, False, True, True])
    with torch.no_grad():
        out = mtp_kernels.gated_lora_linear(x, weight, bias, torch.randn(rank, in_f), torch.randn(out_f, rank), 2.0,
                                            gate)
    torch.testing.assert_close(out, F.linear(x, weight, bias))


def test_forward_shapes_reach_every_launch_branch():
    """Two of test_forward's shapes split K (one with an empty last split) and tile the rank in the interpreter."""
    empty_split = _plan(3, 600, 8, on_cuda=False, target_programs=4)
    assert empty_split.split_k == 4 and (empty_split.split_k - 1) * empty_split.k_per_split >= 600
    tiled = _plan(20, 300, 256, on_cuda=False, target_programs=4)
    assert tiled.split_k == 2 and tiled.shrink_r < 256 and tiled.expand_r < 256


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "in_f", "out_f", "rank"), [(5, 700, 90, 16), (81, 256, 130, 128), (1100, 96, 70, 40)])
def test_gpu_tiles_through_the_interpreter(monkeypatch, dtype, rows, in_f, out_f, rank):
    """The tiles a GPU launch picks (short and tall row tiles, rank tiles below the rank in both kernels,
    split K), run by the interpreter: the CPU tests otherwise see only the interpreter's own tiles."""
    monkeypatch.setenv("MTP_KERNELS", "interpret")
    gpu_plan = gated_lora_module._plan
    monkeypatch.setattr(gated_lora_module, "_plan",
                        lambda rows, k, r, on_cuda, programs: gpu_plan(rows, k, r, on_cuda=True, target_programs=132))
    x, weight, bias, a, b, gate = make(rows, in_f, out_f, rank, dtype, seed=rank)
    out = mtp_kernels.gated_lora_linear(x, weight, bias, a, b, 2.0, gate)
    assert torch.equal(out[~gate], F.linear(x, weight, bias)[~gate])
    assert_lora_rows_close(out, x, weight, bias, a, b, 2.0, gate)


def test_leading_dims_and_no_bias(kernel_mode):
    x, weight, _, a, b, gate = make(7, 40, 24, 4, torch.float32, lead=(3,), bias=False)
    out = mtp_kernels.gated_lora_linear(x, weight, None, a, b, 0.5, gate)
    assert out.shape == (3, 7, 24)
    assert torch.equal(out[~gate], F.linear(x, weight)[~gate])
    assert_lora_rows_close(out, x, weight, None, a, b, 0.5, gate)



@pytest.mark.skipif(not cpu_linear.onednn_runs_bf16(), reason="this CPU's oneDNN emulates bf16: bf16 runs torch_ops")
@pytest.mark.parametrize(("rows", "in_f", "out_f", "rank"), [(37, 70, 50, 5), (1, 33, 17, 1), (20, 300, 40, 256)])
@pytest.mark.parametrize("gated", ["random", "all"])
def test_bf16_on_packed_weights(monkeypatch, rows, in_f, out_f, rank, gated):
    """The default CPU path in bf16 (packed products, the LoRA term rounded in bf16) within the budget."""
    monkeypatch.delenv("MTP_KERNELS", raising=False)
    x, weight, bias, a, b, gate = make(rows, in_f, out_f, rank, torch.bfloat16, gated, seed=rows + rank)
    with torch.no_grad():
        out = mtp_kernels.gated_lora_linear(x, weight, bias, a, b, 2.0, gate)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[~gate], F.linear(x, weight, bias)[~gate])
    assert_lora_rows_close(out, x, weight, bias, a, b, 2.0, gate)

def check_backward_against_the_reference(device):
    x, weight, bias, a, b, gate = (t.to(device) for t in make(29, 40, 24, 6, torch.float32, seed=3))
    weight.requires_grad_(True)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    grad_out = torch.randn(29, 24, device=device)
    mtp_kernels.gated_lora_linear(leaves[0], weight, bias, leaves[1], leaves[2], 1.5, gate).backward(grad_out)
    expected = [t.clone().requires_grad_(True) for t in (x, a, b)]
    weight_ref = weight.detach().clone().requires_grad_(True)
    reference.gated_lora_linear(expected[0], weight_ref, bias, expected[1], expected[2], 1.5, gate).backward(grad_out)
    for got, want in zip(leaves, expected):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(weight.grad, weight_ref.grad, rtol=1e-4, atol=1e-4)


def gradcheck_float64(device):
    x, weight, bias, a, b, gate = (t.to(device) for t in make(9, 12, 7, 3, torch.float64, seed=4))
    inputs = [t.requires_grad_(True) for t in (x, a, b)]
    def op(x, a, b):
        return mtp_kernels.gated_lora_linear(x, weight, bias, a, b, 1.5, gate)

    assert torch.autograd.gradcheck(op, inputs)


def test_single_row_as_a_vector(kernel_mode):
    x, weight, bias, a, b, _ = make(1, 40, 24, 4, torch.float32, seed=5)
    for flag in (False, True):
        out = mtp_kernels.gated_lora_linear(x[0], weight, bias, a, b, 2.0, torch.tensor(flag))
        assert out.shape == (24,)
        if flag:
            torch.testing.assert_close(out, F.linear(x[0], weight, bias) + 2.0 * (x[0] @ a.t()) @ b.t())
        else:
            assert torch.equal(out, F.linear(x[0], weight, bias))


def test_backward_matches_autograd_through_the_reference(kernel_mode):
    check_backward_against_the_reference(torch.device("cpu"))


def test_gradcheck_float64(kernel_mode):
    gradcheck_float64(torch.device("cpu"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.zeros(5, 9)}, "x"),
        ({"weight": torch.zeros(6, 8, dtype=torch.float16)}, "weight"),
        ({"bias": torch.zeros(5)}, "bias"),
        ({"lora_a": torch.zeros(2, 9)}, "lora_a"),
        ({"lora_b": torch.zeros(6, 3)}, "lora_b"),
        ({"gate": torch.zeros(4, dtype=torch.bool)}, "gate"),
        ({"gate": torch.zeros(5)}, "gate"),
    ],
)
def test_bad_input_names_the_tensor(change, message):
    inputs = dict(x=torch.zeros(5, 8), weight=torch.zeros(6, 8), bias=torch.zeros(6), lora_a=torch.zeros(2, 8),
                  lora_b=torch.zeros(6, 2), gate=torch.zeros(5, dtype=torch.bool))
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        mtp_kernels.gated_lora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"],
                                      inputs["lora_b"], 1.0, inputs["gate"])


def test_module_uses_peft_names_and_reads_the_shared_gate(kernel_mode):
    context = GateContext()
    base = torch.nn.Linear(16, 12)
    layer = GatedLoRALinear(base, rank=4, alpha=8, context=context)
    names = {"base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"}
    assert set(dict(layer.named_parameters())) == names
    assert layer.scaling == 2.0 and torch.equal(layer.lora_B.weight, torch.zeros(12, 4))
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 16)
    assert torch.equal(layer(x), base(x))  # no gate set: the base layer
    gate = torch.zeros(2, 5, dtype=torch.bool)
    gate[1, 3] = True
    context.set(gate)
    out = layer(x)
    assert torch.equal(out[~gate], base(x)[~gate])
    expected = base(x)[1, 3] + 2.0 * layer.lora_B(layer.lora_A(x[1, 3]))
    torch.testing.assert_close(out[1, 3], expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_is_the_public_op(monkeypatch, dtype):
    """Outside a prepacked decoding forward the module is the op: outputs and gradients are the public op's
    bit for bit, and a gate assigned directly (as activation checkpointing does) is the one used."""
    monkeypatch.setenv("MTP_KERNELS", "torch")
    x, weight, bias, a, b, gate = make(13, 40, 24, 4, dtype, lead=(2,))
    context = GateContext()
    base = torch.nn.Linear(40, 24, dtype=dtype)
    layer = GatedLoRALinear(base, rank=4, alpha=8, context=context)
    with torch.no_grad():
        for param, value in zip(layer.parameters(), (weight, bias, a, b)):
            param.copy_(value)
    other_gate = ~gate
    grad_out = torch.randn(2, 13, 24).to(dtype)
    expected = {}
    for g in (gate, other_gate):
        leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
        out = mtp_kernels.gated_lora_linear(leaves[0], weight, bias, leaves[1], leaves[2], 2.0, g)
        out.backward(grad_out)
        expected[id(g)] = [out.detach()] + [t.grad for t in leaves]
    context.set(gate)
    for g in (gate, other_gate, gate):
        context.gate = g
        with torch.no_grad():
            assert torch.equal(layer(x), expected[id(g)][0])
        leaf = x.clone().requires_grad_(True)
        layer.zero_grad()
        out = layer(leaf)
        out.backward(grad_out)
        got = [out.detach(), leaf.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
        for have, want in zip(got, expected[id(g)]):
            assert torch.equal(have, want)
        assert torch.equal(out[~g], F.linear(x, weight, bias)[~g])
    context.gate = gate[:, :5]
    with pytest.raises(ValueError, match="gate"):
        layer(x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows", "in_f", "out_f", "rank"),
    [(81, 4096, 1024, 16), (648, 4096, 4096, 128), (1, 14336, 4096, 16), (2000, 1000, 600, 200), (333, 100, 77, 3)],
)
def test_compiled_kernels_on_gpu(dtype, rows, in_f, out_f, rank):
    x, weight, bias, a, b, gate = (t.cuda() if t is not None else None for t in make(rows, in_f, out_f, rank, dtype))
    out = mtp_kernels.gated_lora_linear(x, weight, bias, a, b, 2.0, gate)
    assert torch.equal(out[~gate], F.linear(x, weight, bias)[~gate])
    assert_lora_rows_close(out, x, weight, bias, a, b, 2.0, gate)


@pytest.mark.gpu
def test_compiled_backward_on_gpu():
    check_backward_against_the_reference(torch.device("cuda"))
    gradcheck_float64(torch.device("cuda"))
