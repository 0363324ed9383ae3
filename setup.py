"""Builds fastres.

The Triton kernels live in the top-level folder `kernels/` of the repository but are installed
as `fastres.kernels` (a top-level package named `kernels` exists on PyPI), both for a regular
and an editable install.

The C++/CUDA extension `fastres._C` (folder `csrc/`) is built with ninja against the installed
torch: its CPU part everywhere, its CUDA part where the installed torch is a CUDA build and nvcc
exists. Build with `pip install --no-build-isolation -e .` so that the installed torch is used.
Environment switches:

- FASTRES_BUILD_EXT=0: skip the extension (fastres then runs with the 'torch' backend only);
- FASTRES_CUDA=1 / 0: force / skip the CUDA part (default: auto-detect);
- TORCH_CUDA_ARCH_LIST: GPU architectures; default "8.0;9.0" when no GPU is visible;
- MAX_JOBS: parallel compile jobs (ninja).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

packages = find_packages(include=["fastres", "fastres.*"]) + ["fastres.kernels"]


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() not in ("0", "false", "no", "off")


def _extensions() -> tuple[list, dict]:
    if _flag("FASTRES_BUILD_EXT") is False:
        return [], {}
    # torch is imported only here: without it (or with FASTRES_BUILD_EXT=0) the pure-Python
    # package still installs.
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fastres: torch is not importable, building without the extension fastres._C")
        return [], {}

    sources = ["csrc/fastres.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # at::parallel_for is a header template that forks with `#pragma omp parallel` inside the
    # extension's own code: without -fopenmp it silently runs on one thread.
    openmp = (
        ["-fopenmp"]
        if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info()
        else []
    )
    cxx_flags = ["-O3", *openmp]
    want_cuda = _flag("FASTRES_CUDA")
    has_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda and not has_cuda:
        raise RuntimeError(
            "FASTRES_CUDA=1 but the installed torch is not a CUDA build or nvcc was not found "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})"
        )
    if want_cuda is None:
        want_cuda = has_cuda
    if want_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        ext = cpp_extension.CUDAExtension(
            "fastres._C",
            sources,
            define_macros=[("FASTRES_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo"],
            },
            extra_link_args=openmp,
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastres._C", sources, extra_compile_args=cxx_flags, extra_link_args=openmp
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    packages=packages,
    package_dir={"fastres.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
