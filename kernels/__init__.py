"""Triton kernels of fastres, installed as `fastres.kernels`.

Pure Triton: `@triton.jit` functions and their tuning configs, one fused op per file. The
launchers, custom ops and autograd glue that call them live in the `fastres` package.
"""
