"""Builds fastres.

The Triton kernels live in the top-level folder `kernels/` of the repository but are installed
as `fastres.kernels` (a top-level package named `kernels` exists on PyPI), both for a regular
and an editable install.

The C++/CUDA extension `fastres._C` (folder `csrc/`) is built with ninja against the installed
torch: its CPU part everywhere, its CUDA part where the installed torch is a CUDA build and a CUDA
toolkit is found (`find_cuda_toolkit`: CUDA_HOME, CUDA_PATH, the toolkit behind `nvcc` on PATH
even through a wrapper script, /usr/local/cuda[-*]; the first with nvcc and the runtime headers).
Build with `pip install --no-build-isolation -e .` so that the installed torch is used.
Environment switches:

- FASTRES_BUILD_EXT=0: skip the extension (fastres then runs with the 'torch' backend only);
- FASTRES_CUDA=1 / 0: force / skip the CUDA part (default: auto-detect);
- TORCH_CUDA_ARCH_LIST: GPU architectures; default "8.0;9.0" when no GPU is visible;
- MAX_JOBS: parallel compile jobs (ninja).
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

packages = find_packages(include=["fastres", "fastres.*"]) + ["fastres.kernels"]


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() not in ("0", "false", "no", "off")


def newest_first(roots: list[str]) -> list[str]:
    """cuda-X.Y folders by version, newest first (as text, cuda-9.0 would precede cuda-13.0)."""

    def version(root: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", os.path.basename(root)))

    return sorted(roots, key=version, reverse=True)


DEFAULT_CUDA_ROOTS = ("/usr/local/cuda", *newest_first(glob.glob("/usr/local/cuda-*")))


def _toolkit_behind(nvcc: str) -> str:
    """The toolkit root of an nvcc on PATH: through links, and through a wrapper script that
    execs another nvcc (torch would take the wrapper's parent folder, which has no headers)."""
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    target = re.search(rb"exec\s+[\"']?(/\S*?/nvcc)\b", head) if head.startswith(b"#!") else None
    if target:
        real = os.path.realpath(target.group(1).decode())
    return os.path.dirname(os.path.dirname(real))


def find_cuda_toolkit(default_roots=DEFAULT_CUDA_ROOTS) -> tuple[str | None, list[str]]:
    """The CUDA toolkit to build with: the first of CUDA_HOME, CUDA_PATH, the toolkit behind
    `nvcc` on PATH and the conventional folders that holds nvcc and the runtime's headers.

    Returns:
        (its root, or None; a line per candidate: taken, or passed over and why).
    """
    candidates = [(os.environ[v], v) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append((_toolkit_behind(nvcc), f"nvcc on PATH, {nvcc}"))
    candidates += [(root, "conventional folder") for root in default_roots]
    lines = []
    for root, origin in candidates:
        missing = [
            part
            for part in ("bin/nvcc", "include/cuda_runtime_api.h")
            if not os.path.isfile(os.path.join(root, part))
        ]
        if not missing:
            return root, [*lines, f"{root} ({origin}): taken"]
        lines.append(f"{root} ({origin}): passed over, no {' or '.join(missing)}")
    return None, lines


def _extensions() -> tuple[list, dict]:
    if _flag("FASTRES_BUILD_EXT") is False:
        return [], {}
    # torch is imported only here: without it (or with FASTRES_BUILD_EXT=0) the pure-Python
    # package still installs.
    try:
        import torch
    except ImportError:
        print("fastres: torch is not importable, building without the extension fastres._C")
        return [], {}
    want_cuda = _flag("FASTRES_CUDA")
    cuda_root = None
    if torch.version.cuda is not None and want_cuda is not False:
        # torch.utils.cpp_extension settles on CUDA_HOME when it is imported: choose it first.
        cuda_root, lines = find_cuda_toolkit()
        print("fastres: CUDA toolkit candidates:\n  " + "\n  ".join(lines or ["none"]))
        if cuda_root is not None:
            os.environ["CUDA_HOME"] = cuda_root
    from torch.utils import cpp_extension

    if cuda_root is not None:
        cpp_extension.CUDA_HOME = cuda_root  # in case it was imported before this ran

    sources = ["csrc/fastres.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # at::parallel_for is a header template that forks with `#pragma omp parallel` inside the
    # extension's own code: without -fopenmp it silently runs on one thread.
    openmp = (
        ["-fopenmp"]
        if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info()
        else []
    )
    cxx_flags = ["-O3", *openmp]
    has_cuda = cuda_root is not None
    if want_cuda and not has_cuda:
        raise RuntimeError(
            "FASTRES_CUDA=1 but the installed torch is not a CUDA build or no CUDA toolkit with "
            f"nvcc and headers was found (torch.version.cuda={torch.version.cuda}; candidates "
            "above; set CUDA_HOME to the toolkit's root)"
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


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its functions
    ext_modules, cmdclass = _extensions()
    setup(
        packages=packages,
        package_dir={"fastres.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
