"""The hook by which a layer takes one of kvflow's native CPU kernels (kvflow/kernels), or
on CUDA the Triton kernel of the same name (kvflow/kernels/triton_ops/glue.py).

Every layer type with arithmetic of its own implements it, and says in it whether it runs a
native kernel from then on or stays eager: a new norm or activation cannot be skipped by an
installer that does not know it. Linear layers are the exception: which kernel a linear
shape gets is measured (kernels/tuning.py) and kept in the layer's `plan`. Expert layers
take their kernel here, and have measured there where its GEMMs take over from its GEMVs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from types import ModuleType
from typing import ClassVar


class NativeKernelHook(ABC):
    # The functions of a kernel module this layer calls once attached: a module that lacks
    # one (CUDA's Triton glue has no expert kernel) is never offered to it.
    kernel_ops: ClassVar[tuple[str, ...]]

    @abstractmethod
    def attach_native(self, ops: ModuleType) -> bool:
        """Run through `ops` from now on; False: this layer has no native kernel and runs
        its eager code."""
