"""`python -m kvflow.kernels`: build the native CPU kernels now (make install runs it)."""
from __future__ import annotations

import sys

from kvflow.kernels import build_dir, cpu_ops
from kvflow.logger import configure_logging

configure_logging("INFO")
ops = cpu_ops()
if ops is None:
    print("native CPU kernels: not built; kvflow will use the PyTorch path")
    sys.exit(0)
print(f"native CPU kernels: {build_dir()} (vector paths: {ops.vector_paths()})")
