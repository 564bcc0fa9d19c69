"""Every Triton launch the ops make on an H100 compiles for it, on any machine.

Triton ships ptxas, so compiling to a cubin needs no GPU. The ops' implementations (what each custom op
runs on a CUDA tensor) run on fake CUDA tensors (FakeTensorMode: shapes, dtypes and strides, no memory),
so their own GPU launch planning (block sizes, splits, upcasting) picks the configurations; each launch is
recorded instead of run, then compiled for sm_90. This checks what the interpreter cannot: the compiled
path's types, layouts and resource limits. (Through `torch.ops`, fake tensors would reach the ops' fake
implementations, which launch nothing.) Register spills, which ptxas reports and which make a kernel slow
rather than wrong, are checked for the tree-attention, choice and gated-LoRA kernels, whose tiles were chosen to
fit.
"""

import importlib
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mtp_kernels import backend
from mtp_kernels.gated_lora import _forward as gated_lora_forward
from mtp_kernels.sampler import _choose, _top_k_candidates
from mtp_kernels.tree_attention import _attention as tree_attention

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {
    torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
    torch.int8: "*i8", torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1",
}


def argument_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


@pytest.fixture
def recorded_launches(monkeypatch):
    """Runs the ops as on a GPU that Triton can drive, recording each kernel launch instead of running it."""
    launches = []

    def record(kernel, grid):
        return lambda *args, **kwargs: launches.append((kernel, grid, args, kwargs))

    monkeypatch.setattr(backend.TritonKernel, "__getitem__", record)
    monkeypatch.setattr(backend, "triton_can_drive_cuda", lambda: True)
    monkeypatch.setattr(importlib.import_module("mtp_kernels.gated_lora"), "_sm_count", lambda index: 132)
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield launches


_compiled = {}


def compile_for_h100(kernel, args, kwargs):
    fn = kernel.compiled
    values = dict(zip(fn.arg_names, args), **kwargs)
    signature = {p.name: "constexpr" if p.is_constexpr else argument_type(values[p.name]) for p in fn.params}
    constexprs = {p.name: values[p.name] for p in fn.params if p.is_constexpr}
    key = (fn.__name__, tuple(signature.items()), tuple((k, str(v)) for k, v in constexprs.items()))
    options = {"num_warps": kwargs.get("num_warps", 4)}
    key += tuple(options.items())
    if key not in _compiled:
        _compiled[key] = triton.compile(ASTSource(fn, signature, constexprs), target=H100, options=options)
    return _compiled[key]


def compile_all(launches):
    assert launches, "the op launched no Triton kernel"
    for kernel, _, args, kwargs in launches:
        binary = compile_for_h100(kernel, args, kwargs)
        assert binary.asm["cubin"], kernel.__name__


def cuda(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="cuda", dtype=dtype)


# Each dtype, head dim and launch branch (tile heights, the prefix split) at least once; a compile takes
# seconds, so not the full product.
@pytest.mark.parametrize(
    ("dtype", "B", "Hq", "Hkv", "T", "D", "S"),
    [(torch.bfloat16, 1, 32, 8, 1, 128, 32768), (torch.float16, 8, 32, 8, 81, 128, 2048),
     (torch.float32, 2, 28, 4, 16, 64, 300), (torch.bfloat16, 1, 8, 8, 25, 80, 4096),
     (torch.float16, 4, 16, 2, 9, 96, 512), (torch.bfloat16, 2, 8, 1, 9, 256, 1024)],
)
def test_tree_attention_compiles(recorded_launches, dtype, B, Hq, Hkv, T, D, S):
    lengths = cuda(B, dtype=torch.int64)
    tree_attention(cuda(B, Hq, T, D, dtype=dtype), cuda(B, Hkv, S, D, dtype=dtype), cuda(B, Hkv, S, D, dtype=dtype),
                   lengths, cuda(T, T, dtype=torch.bool), D**-0.5, lengths)
    compile_all(recorded_launches)
    if T == 1 and S == 32768:  # decoding at batch 1 on a long cache takes the split path
        assert len(recorded_launches) == 2


@pytest.mark.parametrize(
    ("dtype", "rows", "in_features", "out_features", "rank"),
    [(torch.bfloat16, 81, 4096, 4096, 16), (torch.float16, 4096, 4096, 14336, 32), (torch.float32, 7, 2048, 256, 256),
     (torch.float64, 33, 512, 512, 8)],
)
def test_gated_lora_compiles(recorded_launches, dtype, rows, in_features, out_features, rank):
    gated_lora_forward(cuda(rows, in_features, dtype=dtype), cuda(out_features, in_features, dtype=dtype), None,
                       cuda(rank, in_features, dtype=dtype), cuda(out_features, rank, dtype=dtype), 2.0,
                       cuda(rows, dtype=torch.bool))
    compile_all(recorded_launches)


@pytest.mark.parametrize(
    ("dtype", "rows", "sample"),
    [(torch.bfloat16, 1, False), (torch.bfloat16, 64, True), (torch.float16, 512, False), (torch.float32, 8, True)],
)
def test_sampler_compiles(recorded_launches, dtype, rows, sample):
    vocab, hidden = 32000, 4096
    noise = cuda(rows, vocab) if sample else None
    _choose(cuda(rows, hidden, dtype=dtype), cuda(vocab, hidden, dtype=dtype), 0.7 if sample else 0.0, None, None,
            noise, False)
    compile_all(recorded_launches)


@pytest.mark.parametrize(("dtype", "rows", "top_k"), [(torch.bfloat16, 1, 50), (torch.float16, 64, 8), (torch.float32, 512, 64)])
def test_top_k_sampler_compiles(recorded_launches, dtype, rows, top_k):
    # The candidate kernel alone: the torch finish after it branches on data, which fake tensors do not have.
    _top_k_candidates(cuda(rows, 4096, dtype=dtype), cuda(32000, 4096, dtype=dtype), 0.7, top_k)
    compile_all(recorded_launches)


def spill_store_bytes(binary):
    """Bytes of spill stores ptxas reports for a compiled kernel, asked as Triton asks it (same ptxas, same
    options); None where this Triton does not say which ptxas it uses."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(H100.arch).path
    except (ImportError, TypeError, AttributeError):
        return None
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(binary.asm["ptx"])
        report = subprocess.run(
            [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(ptx), "-o", str(ptx) + ".o"],
            capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))


# Every branch of the two tile tables, and the top-k candidate kernel: (op, dtype, rows or queries, head
# dim / hidden size, extra).
SPILL_CASES = [
    ("tree", torch.bfloat16, 1, 128, 32768), ("tree", torch.bfloat16, 81, 128, 2048), ("tree", torch.bfloat16, 5, 128, 300),
    ("tree", torch.bfloat16, 1, 256, 300), ("tree", torch.bfloat16, 9, 256, 300), ("tree", torch.float32, 81, 64, 700),
    ("tree", torch.float32, 1, 128, 2100), ("tree", torch.float32, 9, 256, 90),
    ("choice", torch.bfloat16, 1, 4096, False), ("choice", torch.bfloat16, 1, 4096, True),
    ("choice", torch.float16, 20, 2048, True), ("choice", torch.bfloat16, 512, 2048, True),
    ("choice", torch.float32, 8, 4096, False), ("choice", torch.float32, 64, 4096, True),
    ("top_k", torch.bfloat16, 1, 4096, 50), ("top_k", torch.float16, 64, 4096, 8),
    ("lora", torch.bfloat16, 1, 4096, 16), ("lora", torch.bfloat16, 81, 4096, 64), ("lora", torch.bfloat16, 81, 4096, 128),
    ("lora", torch.float16, 4096, 4096, 128), ("lora", torch.bfloat16, 9, 14336, 256), ("lora", torch.bfloat16, 2048, 4096, 512),
    ("lora", torch.float32, 81, 4096, 128), ("lora", torch.float32, 4096, 2048, 64),
]


@pytest.mark.parametrize(("op", "dtype", "rows", "dim", "extra"), SPILL_CASES)
def test_tiles_fit_in_registers(recorded_launches, op, dtype, rows, dim, extra):
    """No spills in 16-bit types, a few words at most in fp32, whose tiles hold twice the bytes: a tile that
    spills runs from local memory, however right."""
    if op == "tree":  # extra: cache slots; 8 query heads over 2 KV heads
        lengths = cuda(2, dtype=torch.int64)
        tree_attention(cuda(2, 8, rows, dim, dtype=dtype), cuda(2, 2, extra, dim, dtype=dtype),
                       cuda(2, 2, extra, dim, dtype=dtype), lengths, cuda(rows, rows, dtype=torch.bool), dim**-0.5, lengths)
    elif op == "lora":  # dim: in and out features; extra: rank
        gated_lora_forward(cuda(rows, dim, dtype=dtype), cuda(dim, dim, dtype=dtype), None, cuda(extra, dim, dtype=dtype),
                           cuda(dim, extra, dtype=dtype), 2.0, cuda(rows, dtype=torch.bool))
    elif op == "top_k":  # extra: top_k
        _top_k_candidates(cuda(rows, dim, dtype=dtype), cuda(32000, dim, dtype=dtype), 0.7, extra)
    else:  # extra: sampling (noise) or greedy
        vocab = 32000
        _choose(cuda(rows, dim, dtype=dtype), cuda(vocab, dim, dtype=dtype), 0.7 if extra else 0.0, None, None,
                cuda(rows, vocab) if extra else None, False)
    limit = 0 if dtype.itemsize == 2 else 64
    for kernel, _, args, kwargs in recorded_launches:
        spilled = spill_store_bytes(compile_for_h100(kernel, args, kwargs))
        if spilled is None:
            pytest.skip("this Triton does not name its ptxas")
        assert spilled <= limit, f"{kernel.__name__} spills {spilled} bytes a thread"
