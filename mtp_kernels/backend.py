"""Where each op runs: compiled Triton on CUDA, the Triton interpreter or the torch reference on CPU.

Every public op asks `use_triton(tensor)` once per call:

- CUDA tensor: the compiled Triton kernel (if Triton can drive the GPU; otherwise the torch reference
  with one warning).
- CPU tensor: the torch path (`mtp_kernels.reference`; SDPA for tree attention), unless `MTP_KERNELS=interpret`,
  which runs the same Triton kernels through Triton's interpreter so they can be checked without a GPU.
- `MTP_KERNELS=reference` forces the torch reference everywhere.

The environment variable is read at every call, so tests can switch modes per test.

Kernels are declared with `@triton_kernel` instead of `@triton.jit`. A `triton_kernel` keeps a compiled and
an interpreted version side by side and picks one at launch from the device of the tensors it is given.
That is the per-kernel choice the interpreter needs: setting `TRITON_INTERPRET=1` would switch every
Triton user in the process. While one of our kernels runs in the interpreter, the `@triton.jit` helpers
it calls (ours and Triton's own, such as `tl.zeros`) are interpreted as well; outside that, JITFunctions
behave exactly as Triton defines them.

The compiled extension `mtp_kernels._C` (KV-cache compaction) is optional: without it the ops fall back to
their torch implementations and `import mtp_kernels` warns once.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
import warnings

import torch

MODES = ("auto", "interpret", "reference")
ENV_VAR = "MTP_KERNELS"

try:
    import triton
    from triton.runtime import interpreter as triton_interpreter
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    HAS_TRITON = True
except ImportError:  # triton only ships for Linux; everything still runs through the reference
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


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op called on `tensor` should run its Triton kernel (compiled or interpreted)."""
    requested = mode()
    if requested == "reference":
        return False
    if tensor.is_cuda:
        if triton_can_drive_cuda():
            return True
        warn_once("mtp_kernels: Triton cannot launch on this GPU; using the torch reference ops")
        return False
    if requested == "interpret":
        if not HAS_TRITON:
            raise RuntimeError(f"{ENV_VAR}=interpret needs the triton package, which is not installed")
        return True
    return False


if HAS_TRITON:
    _interpreting = threading.local()

    def _call_jit_function(self, *args, **kwargs):
        # A JITFunction is never called from Python: the compiler inlines it. The one exception is a kernel
        # running in the interpreter, which executes its body as Python and so calls the @jit helpers it
        # uses (its own and Triton's, e.g. tl.zeros, tl.max): run those through the interpreter too.
        if getattr(_interpreting, "active", False):
            interpreted = self.__dict__.get("_mtp_interpreted")
            if interpreted is None:
                interpreted = self.__dict__["_mtp_interpreted"] = InterpretedFunction(self.fn)
            return _call_interpreted_helper(interpreted, args, kwargs)
        return _stock_jit_call(self, *args, **kwargs)

    def _call_interpreted_helper(interpreted, args, kwargs):
        # InterpretedFunction.__call__ patches triton.language for the helper (`_patch_lang`) and, in Triton
        # 3.9, never undoes it: triton.language.core's functions stay patched after the kernel ends, and the
        # next compilation in the process fails inside them. Undo the helper's patches when it returns.
        stock_patch_lang = triton_interpreter._patch_lang
        scopes = []

        def patch_lang(fn):
            scope = stock_patch_lang(fn)
            scopes.append(scope)
            return scope

        triton_interpreter._patch_lang = patch_lang
        try:
            return interpreted(*args, **kwargs)
        finally:
            triton_interpreter._patch_lang = stock_patch_lang
            for scope in reversed(scopes):
                if hasattr(scope, "restore"):  # releases before the patch scopes restored nothing either
                    scope.restore()

    _stock_jit_call = JITFunction.__call__
    if JITFunction.__call__.__name__ != _call_jit_function.__name__:  # once, even if reloaded
        JITFunction.__call__ = _call_jit_function

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
            return InterpretedFunction(self.fn, **self._jit_kwargs)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
                    return self.compiled[grid](*args, **kwargs)
                _interpreting.active = True
                try:
                    return self.interpreted[grid](*args, **kwargs)
                finally:
                    _interpreting.active = False

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
