"""The 'triton' backend: fused Triton convolutions (CUDA, or CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

from .backends import Backend


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, device_type: str | None = None) -> str | None:
        return "the fused Triton convolution is not part of this version yet"
