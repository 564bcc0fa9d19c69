"""Where each op runs: compiled Triton on CUDA, the Triton interpreter or torch on CPU.

Every op is a torch custom op whose implementation asks `use_triton(tensor)` once per call:

- CUDA tensor: the compiled Triton kernel (if Triton can drive the GPU; otherwise `torch_ops`
  with one warning).
- CPU tensor: the CPU implementation (`mtp_kernels.torch_ops`, SDPA for tree attention, oneDNN on packed
  weights for the LM head), unless `MTP_KERNELS=interpret`, which runs the same Triton kernels through
  Triton's interpreter so they can be checked without a GPU.
- `MTP_KERNELS=torch` forces the torch implementations (`torch_ops`, F.linear) everywhere.

The environment variable is read at every call, so tests can switch modes per test.

Kernels are declared with `@triton_kernel` instead of `@triton.jit`. A `triton_kernel` keeps a compiled and
an interpreted version side by side and picks one at launch from the device of the tensors it is given.
Why: setting `TRITON_INTERPRET=1` would switch every Triton user in the process. The interpreted version
runs with a private copy of the kernel's globals in which `triton.language` and every `@triton.jit`
function it reaches (ours, and Triton's own such as `tl.max`) are interpreted stand-ins; nothing of
Triton's is replaced, so importing this package changes nothing for other Triton users. (During an
interpreted launch Triton's interpreter itself swaps its builtins into `triton.language`, as it always
does, and restores them when the launch ends.)

The compiled extension `mtp_kernels._C` (KV-cache compaction) is optional: without it the ops fall back to
their torch implementations and `import mtp_kernels` warns once.
"""

from __future__ import annotations

import functools
import importlib
import os
import types
import warnings

import torch

MODES = ("auto", "interpret", "torch")
ENV_VAR = "MTP_KERNELS"

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import FunctionRewriter, InterpretedFunction
    from triton.runtime.jit import JITFunction

    HAS_TRITON = True
except ImportError:  # triton only ships for Linux; everything still runs through torch_ops
    triton = None
    HAS_TRITON = False


def mode() -> str:
    """The requested mode from `MTP_KERNELS` ('auto' when unset)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {MODES}")
    return value


@functools.lru_cache(maxsize=None)
def triton_can_drive_cuda() -> bool:
    """True when compiled Triton kernels can launch on this machine's GPU."""
    if not (HAS_TRITON and torch.cuda.is_available()):
        return False
    try:
        triton.runtime.driver.active.get_current_target()
        return True
    except Exception:
        return False


def eager(tensor: torch.Tensor) -> bool:
    """Whether a public op may run its implementation directly instead of through `torch.ops.mtp_kernels`:
    `tensor` is a plain tensor in plain eager mode (not compiling or tracing, no torch function or dispatch
    mode active). The implementation is the function the op runs, so the result is the same; going around
    the dispatcher saves its per-call cost, which a CPU decoding step of a few milliseconds would feel."""
    return (type(tensor) is torch.Tensor and not torch.compiler.is_compiling()
            and not torch._C._is_torch_function_mode_enabled() and torch._C._len_torch_dispatch_stack() == 0)


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op called on `tensor` should run its Triton kernel (compiled or interpreted)."""
    requested = mode()
    if requested == "torch":
        return False
    if tensor.is_cuda:
        if triton_can_drive_cuda():
            return True
        warn_once("mtp_kernels: Triton cannot launch on this GPU; using the torch implementations")
        return False
    if requested == "interpret":
        if not HAS_TRITON:
            raise RuntimeError(f"{ENV_VAR}=interpret needs the triton package, which is not installed")
        return True
    return False


if HAS_TRITON:

    class _Interpreting:
        """A module of `triton.language` as an interpreted kernel sees it: every attribute is the module's
        own at the time of the call (the interpreter swaps in its builtins while a kernel runs), except
        that `@triton.jit` functions (Triton's own, such as `tl.max`, and those they call) come back
        interpreted."""

        __slots__ = ("_module",)

        def __init__(self, module):
            object.__setattr__(self, "_module", module)

        def __getattr__(self, name):
            return _for_interpreter(getattr(self._module, name))

    class _InterpretedHelper:
        """A `@triton.jit` helper called from an interpreted kernel: its body runs as Python, in a copy of
        its globals where Triton's modules and other helpers are interpreted as well."""

        def __init__(self, jit_function):
            self._jit_function = jit_function  # copied at first use: helpers refer to each other

        @functools.cached_property
        def fn(self):
            """The plain Python function, as `JITFunction.fn` (the interpreter's reductions call it)."""
            return _interpreted_copy(self._jit_function.fn)

        @functools.cached_property
        def _body(self):
            return FunctionRewriter(self.fn).rewrite_ast()

        def __call__(self, *args, **kwargs):
            # The kernel's launch (GridExecutor) has already patched triton.language and its core for the
            # run and restores them afterwards; InterpretedFunction.__call__ would patch again and, in
            # Triton 3.9, never restore. So run the rewritten body as it is.
            return self._body(*args, **kwargs)

    _interpreted: dict[int, object] = {}  # id(JITFunction or module) -> its interpreted stand-in

    def _for_interpreter(value):
        if isinstance(value, JITFunction) or (
                isinstance(value, types.ModuleType) and value.__name__.startswith("triton.language")):
            stand_in = _interpreted.get(id(value))
            if stand_in is None:
                stand_in = _interpreted[id(value)] = (
                    _InterpretedHelper(value) if isinstance(value, JITFunction) else _Interpreting(value))
            return stand_in
        return value

    def _interpreted_copy(fn):
        """`fn` with a private copy of its globals in which Triton's language modules and `@triton.jit`
        functions are their interpreted stand-ins; the real `triton.language` and its core stay reachable
        under private names, which is where the interpreter looks for the modules to patch during a run."""
        namespace = {name: _for_interpreter(value) for name, value in fn.__globals__.items()}
        namespace["_mtp_real_tl"], namespace["_mtp_real_tl_core"] = tl, tl.core
        copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__kwdefaults__, copy.__annotations__ = fn.__kwdefaults__, dict(fn.__annotations__)
        return functools.update_wrapper(copy, fn, assigned=("__module__", "__qualname__", "__doc__"), updated=())

    class TritonKernel:
        """A Triton kernel available both compiled (CUDA tensors) and interpreted (CPU tensors)."""

        def __init__(self, fn, **jit_kwargs):
            self.fn = fn
            self._jit_kwargs = jit_kwargs
            functools.update_wrapper(self, fn)

        @functools.cached_property
        def compiled(self):
            return triton.jit(self.fn, **self._jit_kwargs)

        @functools.cached_property
        def interpreted(self):
            return InterpretedFunction(_interpreted_copy(self.fn), **self._jit_kwargs)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
                    return self.compiled[grid](*args, **kwargs)
                return self.interpreted[grid](*args, **kwargs)

            return launch


def triton_kernel(fn=None, **jit_kwargs):
    """Decorator for Triton kernels, used instead of `@triton.jit` (see the module docstring).

    Helpers called from a kernel stay plain `@triton.jit` functions.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")

    def wrap(f):
        return TritonKernel(f, **jit_kwargs)

    return wrap(fn) if fn is not None else wrap


# --- compiled extension -------------------------------------------------------------------------------

try:
    # Importing the module registers torch.ops.mtp_kernels.*.
    _C = importlib.import_module("mtp_kernels._C")
    _EXTENSION_ERROR = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    _EXTENSION_ERROR = error


def has_extension() -> bool:
    """True when the compiled extension `mtp_kernels._C` is loaded."""
    return _C is not None


if _C is None and os.environ.get("MTP_SKIP_EXTENSION", "0") != "1":
    warnings.warn(
        f"mtp_kernels: compiled extension mtp_kernels._C not available ({_EXTENSION_ERROR}); "
        "kv_compact uses its torch implementation. Rebuild with "
        "`pip install --no-build-isolation -e .` to compile it.",
        RuntimeWarning,
        stacklevel=2,
    )
