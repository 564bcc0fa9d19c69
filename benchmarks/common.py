"""Shared pieces of the benchmarks: the device, shape grids per device, and a synchronising runner.

On a GPU every benchmark runs its full grid (Llama-3-8B shapes); on CPU a tiny grid, so that
`pytest benchmarks --benchmark-disable` smoke-runs every benchmark in seconds.
"""

import statistics
import time

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def grid(gpu_values, cpu_values):
    return gpu_values if ON_GPU else cpu_values


def run(benchmark, fn, *args, **kwargs):
    """Times fn(*args) with the GPU synchronised, so the time covers the kernels, not their launch."""

    def call():
        result = fn(*args, **kwargs)
        if ON_GPU:
            torch.cuda.synchronize()
        return result

    call()  # warm-up: compilation and autotuning stay out of the timing
    return benchmark(call)


def median_seconds(fn, *args, repeats=20):
    """Median time of fn(*args), synchronised as `run` times it."""
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        fn(*args)
        if ON_GPU:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else "cpu"
