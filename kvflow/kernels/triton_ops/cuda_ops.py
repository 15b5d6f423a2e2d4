"""What CUDA's layers take through their kernel hooks, under the native CPU kernels'
names (kvflow/layers/native.py): Triton's glue (glue.py) and its expert kernel (moe.py)."""
from __future__ import annotations

from kvflow.kernels.triton_ops.glue import rms_norm, rotary_embedding, silu_and_mul
from kvflow.kernels.triton_ops.moe import moe_experts

__all__ = ["rms_norm", "rotary_embedding", "silu_and_mul", "moe_experts"]

# Its moe_experts never reads the routing back to the host, so a CUDA graph can hold an
# expert layer that runs through it (FusedMoE.routes_on_device).
EXPERTS_ROUTE_ON_DEVICE = True
