"""The interface every backend implements (the registry is `fastres.backends`)."""

from __future__ import annotations

from torch import Tensor, nn


class Backend:
    """One way of running a model's stem and blocks.

    Subclasses override `unavailable_reason` and the `run_*` methods; the defaults are the
    oracle's.
    """

    name = "torch"

    def unavailable_reason(self, device_type: str | None = None) -> str | None:
        """Why this backend cannot run here (on `device_type`, or on any device if None).

        Returns None when it can run.
        """
        return None

    def run_stem(self, model: nn.Module, x: Tensor) -> Tensor:
        return model.stem_reference(x)

    def run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        return block.forward_reference(x)

    def forget(self, modules: list[nn.Module]) -> None:
        """Drops what this backend keeps for these modules (folded weights): it lost their
        block to another one (`fastres.backends.select`)."""


ORACLE = Backend()
