"""The 'native' backend: PyTorch convolution + the fused BatchNorm ops of fastres._C."""

from __future__ import annotations

from .backends import Backend


class NativeBackend(Backend):
    name = "native"

    def unavailable_reason(self, device_type: str | None = None) -> str | None:
        return "the fused BatchNorm extension fastres._C is not part of this version yet"
