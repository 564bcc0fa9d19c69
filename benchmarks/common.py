"""Shared pieces of the benchmarks: the device, shape grids per device, a synchronising runner, and a
shipped model with its adapter and prompts for the end-to-end measurement scripts.

On a GPU every benchmark runs its full grid (Llama-3-8B shapes); on CPU a tiny grid, so that
`pytest benchmarks --benchmark-disable` smoke-runs every benchmark in seconds.
"""

import json
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
    """Median time of fn(*args). On a GPU its device time: replays of a CUDA graph of the call
    (`triton.testing.do_bench_cudagraph`), so the ratios that state targets judge kernels, not the Python,
    checks and launches around them, which an eager call pays on every op (140-360 us a call on the first
    GPU machine, whatever the size: benchmarks/results/README.md) and a compiled or graphed step does not;
    each benchmark's own pytest-benchmark timing keeps that wall clock. A call that cannot be captured
    (it reads a value on the host) is timed by the wall clock, synchronised, as on a CPU."""
    if ON_GPU:
        seconds = _graph_replay_seconds(fn, *args)
        if seconds is not None:
            return seconds
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        fn(*args)
        if ON_GPU:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _graph_replay_seconds(fn, *args) -> float | None:
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(lambda: fn(*args), rep=50, return_mode="median") / 1e3
    except RuntimeError as error:  # not capturable: a host sync inside
        torch.cuda.synchronize()
        print(f"\nmedian_seconds: {getattr(fn, '__name__', fn)} cannot be captured in a CUDA graph ({error}); "
              "timing its wall clock")
        return None


def check_target(benchmark, name: str, value: float, limit: float, higher_is_better: bool = False) -> None:
    """Records a measured figure and, when the benchmark times on a GPU (the targets are GPU targets),
    asserts its target: a smoke run (`--benchmark-disable`) or a CPU run records without judging."""
    target = f"{'>=' if higher_is_better else '<='} {limit}"
    benchmark.extra_info[name] = value
    benchmark.extra_info[f"{name}_target"] = target
    print(f"\ntarget {benchmark.name}: {name} = {value:.3f}, target {target}")
    if ON_GPU and benchmark.enabled:
        met = value >= limit if higher_is_better else value <= limit
        assert met, f"{name} = {value:.3f}, target {target}"


def device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else "cpu"


def shipped_model_and_prompts(name: str):
    """(model patched with its shipped adapter, fp32 on the CPU; prompt ids [1, P] each) for `name`, the
    demo model ("demo-model") or a known model: the first public prompt of each domain for a chat model,
    three held-out prompts for the demo model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mtp_model
    from mtp_model.checkpoints import model_directory
    from mtp_model.demo_cli import DEMO_MODEL_DIR

    demo = name == "demo-model"
    model_dir = DEMO_MODEL_DIR if demo else model_directory(name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = mtp_model.patch(model, adapter=DEMO_MODEL_DIR / "adapter" if demo else name)
    if tokenizer.chat_template:
        from mtp_model.evaluate import public_prompts

        prompts = [tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]
                   for _, messages in public_prompts("public", per_domain=1)]
    else:
        held_out = [json.loads(line) for line in (model_dir / "heldout.jsonl").read_text().splitlines() if line]
        prompts = [tokenizer(record["prompt"], return_tensors="pt")["input_ids"] for record in held_out[::15][:3]]
    return model, prompts
