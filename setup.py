"""Builds the optional compiled extension `mtp_kernels._C` (KV-cache compaction).

- CPU implementation (`csrc/kv_compact.cpp`): always, whenever torch is importable.
- CUDA implementation (`csrc/kv_compact_cuda.cu`): only when torch itself was built with CUDA and a
  toolkit is found (`torch.utils.cpp_extension.CUDA_HOME`); a CPU torch cannot link a CUDA extension.
- `MTP_SKIP_EXTENSION=1` skips the compiled part entirely.

If compiling fails, the package still installs and `mtp_kernels` falls back to its torch implementation
with one warning at import.
"""

import os

from setuptools import setup


def _extensions():
    if os.environ.get("MTP_SKIP_EXTENSION", "0") == "1":
        print("MTP_SKIP_EXTENSION=1: not building mtp_kernels._C")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("torch is not importable at build time: not building mtp_kernels._C")
        return [], {}

    cxx_flags = ["-O3", "-std=c++17"]
    sources = ["csrc/kv_compact.cpp"]
    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    if with_cuda and os.environ.get("MTP_SKIP_CUDA", "0") != "1":
        extension = cpp_extension.CUDAExtension(
            "mtp_kernels._C",
            sources + ["csrc/kv_compact_cuda.cu"],
            define_macros=[("MTP_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
        )
    else:
        extension = cpp_extension.CppExtension(
            "mtp_kernels._C", sources, extra_compile_args={"cxx": cxx_flags}
        )

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """A compile failure (ninja raises RuntimeError, which setuptools' `optional` does not catch)
        leaves the package installable; `mtp_kernels` then warns once and uses torch."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any compiler or toolchain failure
                print(f"WARNING: building mtp_kernels._C failed ({error}); installing without it")
                self.extensions = []  # nothing to copy or to list as an output

    return [extension], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
