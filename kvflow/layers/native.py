"""The hook by which a layer takes one of kvflow's native CPU kernels (kvflow/kernels).

Every layer type with arithmetic of its own implements it, and says in it whether it runs a
native kernel from then on or stays eager: a new norm or activation cannot be skipped by an
installer that does not know it. Linear layers are the exception: which kernel a linear
shape gets is measured (kernels/tuning.py) and kept in the layer's `plan`. Expert layers
take their kernel here, and have measured there where its GEMMs take over from its GEMVs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from types import ModuleType


class NativeKernelHook(ABC):
    @abstractmethod
    def attach_native(self, ops: ModuleType) -> bool:
        """Run through `ops` from now on; False: this layer has no native kernel and runs
        its eager code."""
