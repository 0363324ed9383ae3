"""Triton kernels of fastres, installed as `fastres.kernels`.

Pure Triton: `@triton.jit` functions and their tuning configs, one kernel per file, named as the
op it runs (`fastres.ops.<name>`); `conv2d_bn_train` runs `conv2d_fused_kernel` with its input
BatchNorm prologue and statistics epilogue switched on, whose per-tile statistics
`merge_tile_stats_kernel` merges (the second stage of `fastres.ops.conv2d_fused`'s statistics).
The launchers, custom ops and autograd glue that call them live in the `fastres` package. The
folder is `kernels/` in the repository and `fastres.kernels` when installed (setup.py maps it).
"""
