"""Launchers and `fastres::` custom ops of the fused kernels, one module per fused op."""
