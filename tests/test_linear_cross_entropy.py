"""linear_cross_entropy (chunked, gradients made in the forward) against the fp64 reference: loss and
gradients for several chunk sizes, row weights, ignored rows and narrow dtypes; and its bad inputs."""

import pytest
import reference
import torch

from mtp_kernels.linear_cross_entropy import linear_cross_entropy


def inputs(N, d, V, dtype, seed, ignored=0.3):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(V, d, generator=generator) / d**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=generator)
    labels[torch.rand(N, generator=generator) < ignored] = -100
    row_weights = torch.rand(N, generator=generator) + 0.1
    return hidden, weight, labels, row_weights


@pytest.mark.parametrize("N, d, V, chunk_rows", [(37, 16, 101, 5), (64, 32, 1000, 64), (1, 8, 7, None), (50, 24, 333, 1)])
def test_loss_and_gradients_match_the_fp64_reference(N, d, V, chunk_rows):
    hidden, weight, labels, row_weights = inputs(N, d, V, torch.float64, seed=N + V)
    ours = linear_cross_entropy(hidden, weight, labels, row_weights, chunk_rows=chunk_rows)
    want = reference.linear_cross_entropy(hidden, weight, labels, row_weights)
    torch.testing.assert_close(ours.double(), want, rtol=1e-6, atol=1e-7)
    scale = torch.tensor(1.7, dtype=torch.float64)
    for got, expected in zip(torch.autograd.grad(ours * scale, (hidden, weight)),
                             torch.autograd.grad(want * scale, (hidden, weight))):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_float64_without_row_weights_is_float64_exact():
    hidden, weight, labels, _ = inputs(30, 16, 77, torch.float64, seed=5)
    ours = linear_cross_entropy(hidden, weight, labels)
    want = reference.linear_cross_entropy(hidden, weight, labels, torch.ones(30, dtype=torch.float64))
    torch.testing.assert_close(ours, want, rtol=1e-13, atol=1e-13)


def test_a_second_derivative_is_refused_not_dropped():
    hidden, weight, labels, row_weights = inputs(10, 8, 20, torch.float64, seed=6)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(linear_cross_entropy(hidden, weight, labels, row_weights), hidden, create_graph=True)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_narrow_dtypes_stay_close_to_fp64(dtype, tolerance):
    hidden, weight, labels, row_weights = inputs(40, 32, 500, dtype, seed=3)
    ours = linear_cross_entropy(hidden, weight, labels, row_weights, chunk_rows=7)
    (grad,) = torch.autograd.grad(ours, hidden)
    assert grad.dtype == dtype
    hidden64, weight64 = hidden.detach().double().requires_grad_(), weight.detach().double()
    want = reference.linear_cross_entropy(hidden64, weight64, labels, row_weights)
    (want_grad,) = torch.autograd.grad(want, hidden64)
    torch.testing.assert_close(ours.double(), want, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grad.double(), want_grad, rtol=tolerance, atol=tolerance)


def test_frozen_weight_gets_no_gradient_and_no_rows_give_zero():
    hidden, weight, labels, _ = inputs(10, 8, 20, torch.float32, seed=4)
    weight = weight.detach()
    loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None
    empty = linear_cross_entropy(hidden, weight, torch.full((10,), -100))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


@pytest.mark.parametrize("change, message", [
    (lambda h, w, l: (h, w[:, :-1], l), "hidden's width"),
    (lambda h, w, l: (h, w, l[:-1]), "one label per row"),
    (lambda h, w, l: (h, w, l.float()), "labels has dtype"),
    (lambda h, w, l: (h, w, torch.full_like(l, 99)), "outside"),
])
def test_bad_inputs_are_named(change, message):
    hidden, weight, labels, _ = inputs(6, 8, 20, torch.float32, seed=5, ignored=0.0)
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(*change(hidden, weight, labels))
