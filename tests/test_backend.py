"""Backend dispatch: which path an op takes, the per-kernel interpreter, and the optional extension."""

import os
import subprocess
import sys

import pytest
import torch

from mtp_kernels import backend

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _twice(x):
    return x * 2


@backend.triton_kernel
def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside).to(tl.float32)
    tl.store(y_ptr + offsets, _twice(x) + tl.zeros([BLOCK], dtype=tl.float32) + 1, mask=inside)


def test_mode_defaults_to_auto_and_rejects_unknown(monkeypatch):
    monkeypatch.delenv("MTP_KERNELS", raising=False)
    assert backend.mode() == "auto"
    monkeypatch.setenv("MTP_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="MTP_KERNELS"):
        backend.mode()


@pytest.mark.parametrize(
    ("env", "expected"), [("auto", False), ("torch", False), ("interpret", True)]
)
def test_cpu_tensors_use_torch_unless_interpret(monkeypatch, env, expected):
    monkeypatch.setenv("MTP_KERNELS", env)
    assert backend.use_triton(torch.zeros(1)) is expected


def test_interpreted_kernel_with_jit_helpers_runs_on_cpu():
    x = torch.randn(37, dtype=torch.bfloat16)
    y = torch.empty(37, dtype=torch.float32)
    _scale_kernel[(triton.cdiv(37, 16),)](x, y, 37, BLOCK=16)
    torch.testing.assert_close(y, x.float() * 2 + 1)


@backend.triton_kernel
def _max_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n, other=float("-inf"))
    tl.store(y_ptr, tl.max(_twice(x), axis=0))  # tl.max: one of Triton's own @jit helpers


def test_interpreting_a_kernel_leaves_triton_language_as_it_was():
    """The interpreter patches triton.language while a kernel and its helpers run; what a helper patched
    must be undone too, or compiling a kernel later in the process fails inside the patched functions."""
    namespaces = [tl, tl.core, tl.math, tl.core.tensor, tl.core.dtype]
    before = [dict(vars(namespace)) for namespace in namespaces]
    x = torch.randn(21)
    y = torch.empty(1)
    _max_kernel[(1,)](x, y, 21, BLOCK=32)
    assert y.item() == 2 * x.max().item()
    after = [dict(vars(namespace)) for namespace in namespaces]
    for namespace, old, new in zip(namespaces, before, after):
        changed = [name for name in old.keys() | new.keys() if old.get(name) is not new.get(name)]
        assert not changed, f"{namespace}: {sorted(changed)[:5]} still patched"


def test_interpreter_choice_does_not_leak_to_the_process():
    # Other Triton users in the process must still get compiled kernels.
    assert os.environ.get("TRITON_INTERPRET") in (None, "0", "")
    def untouched(x_ptr):
        pass

    helper = triton.jit(untouched)
    assert type(helper) is triton.runtime.jit.JITFunction
    with pytest.raises(RuntimeError, match="outside of the scope of a kernel"):
        helper(None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cpu_machine_never_launches_on_a_gpu(monkeypatch):
    monkeypatch.setenv("MTP_KERNELS", "auto")
    assert not backend.triton_can_drive_cuda()


def test_import_without_extension_warns_once_and_falls_back(tmp_path):
    # A stand-in `mtp_kernels._C` that fails to import, the way a missing or broken build does.
    script = (
        "import sys, types, warnings\n"
        "class Blocker:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mtp_kernels._C':\n"
        "            raise ImportError('simulated missing extension')\n"
        "sys.meta_path.insert(0, Blocker())\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import mtp_kernels\n"
        "    import torch\n"
        "    caches = [torch.arange(24.).reshape(1, 1, 6, 4)]\n"
        "    lengths = torch.tensor([1])\n"
        "    mtp_kernels.kv_compact(caches, lengths, torch.tensor([[0, 2]]), 3)\n"
        "messages = [str(w.message) for w in caught if 'mtp_kernels._C' in str(w.message)]\n"
        "assert len(messages) == 1, messages\n"
        "assert not mtp_kernels.backend.has_extension()\n"
        "assert lengths.tolist() == [3], lengths\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "MTP_SKIP_EXTENSION": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_importing_the_package_changes_nothing_in_triton():
    """A fresh process: triton's JITFunction, its interpreter and triton.language resolve every name as they
    did before `import mtp_kernels`, also after one of its kernels ran in the interpreter."""
    script = (
        "import torch, triton, triton.language as tl\n"
        "from triton.runtime import interpreter, jit\n"
        "spaces = [jit.JITFunction, interpreter.InterpretedFunction, interpreter, tl, tl.core, tl.math, tl.core.tensor]\n"
        "def members(space):\n"
        "    return {name: getattr(space, name) for name in dir(space)}\n"
        "before = [members(s) for s in spaces]\n"
        "import mtp_kernels, os\n"
        "os.environ['MTP_KERNELS'] = 'interpret'\n"
        "x = torch.randn(5, 8)\n"
        "mtp_kernels.choose_tokens(x, torch.randn(7, 8))\n"
        "after = [members(s) for s in spaces]\n"
        "for space, old, new in zip(spaces, before, after):\n"
        "    changed = [n for n in (old.keys() | new.keys()) - {'__dict__'}\n"
        "               if not (old.get(n) is new.get(n) or bool(old.get(n) == new.get(n)))]\n"
        "    assert not changed, (space, changed)\n"
        "assert os.environ.get('TRITON_INTERPRET') in (None, '0', '')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "MTP_SKIP_EXTENSION": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
