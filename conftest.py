"""Fixtures shared by tests/ and benchmarks/."""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["torch", "interpret"])
def kernel_mode(request, monkeypatch):
    """Runs a CPU test once through the torch implementations and once through the Triton interpreter."""
    monkeypatch.setenv("MTP_KERNELS", request.param)
    return request.param


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
