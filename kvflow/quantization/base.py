"""The quantization seam: a method per linear layer (vLLM's `quant_method`).

A `Linear` asks its method to create its parameters and to compute its product, so the
unquantized path and each weight format are interchangeable and the model file never
changes per format. Every parameter a method creates carries a
`weight_loader(param, loaded, shard)` that takes the checkpoint tensor as it is (any
dtype) and writes the rows of `shard` (None: the whole layer); a parameter that no
checkpoint tensor fills (a scale computed while quantizing the weight) is marked
`filled_by` the parameter whose loader writes it.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.kernels.variants import DEFAULT, GemvVariant

if TYPE_CHECKING:
    from kvflow.layers.linear import Linear
    from kvflow.layers.moe import ExpertMethod

WeightLoader = Callable[[nn.Parameter, torch.Tensor, "str | None"], None]


class LinearMethod(ABC):
    """How one linear layer stores its weight and computes x @ W.T (+ bias)."""

    @abstractmethod
    def create_weights(self, layer: Linear, bias: bool) -> None:
        """Register the layer's parameters (in the default dtype where they are not
        packed), each with a weight_loader."""

    @abstractmethod
    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in_features] -> [rows, out_features], in x's dtype."""

    def columns_of(self, weight: torch.Tensor | PrequantizedWeight, first: int, width: int,
                   whole: int) -> torch.Tensor | PrequantizedWeight:
        """Input columns [first, first + width) of a checkpoint weight of `whole` columns,
        for the tensor-parallel rank that holds them (kvflow/distributed/
        tensor_parallel.py), in a form the layer's loader takes. A method whose scales
        span whole rows quantizes the whole rows first, so that each rank holds what one
        rank would; a method whose packing is not row-major cuts its own."""
        if isinstance(weight, PrequantizedWeight):
            return prequantized_columns(weight, first, width, whole)
        return weight.narrow(1, first, width)


class QuantizationConfig(ABC):
    """A weight format chosen for a whole model: hands each quantized layer its method."""

    name: str

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethod:
        """The method of the layer named `prefix` (its checkpoint name, e.g.
        "model.layers.0.self_attn.qkv_proj"; "" where the caller has none): a file whose
        tensors come in several formats (GGUF) answers per layer."""

    def expert_method(self, prefix: str) -> ExpertMethod:
        """The method of the expert layer named `prefix` (kvflow/layers/moe.py). A format
        without one refuses the layer rather than leave its experts, most of an MoE
        model's weights, in another format than asked for."""
        raise ValueError(f"quantization {self.name!r} has no method for expert layers yet "
                         f"({prefix}): run mixture-of-experts models unquantized")


@dataclass(frozen=True)
class PrequantizedWeight:
    """A checkpoint weight already in a quantized method's layout (read from a GGUF file,
    say): `parts` are what the method's quantize function would return for it, in that
    order, and `layout` names the layout so that a method never takes another's parts."""

    layout: str
    parts: tuple[torch.Tensor, ...]


def prequantized_columns(weight: PrequantizedWeight, first: int, width: int,
                         whole: int) -> PrequantizedWeight:
    """Input columns [first, first + width) of a weight stored quantized, every part laid
    out row-major by output row with its columns a fixed fraction of the weight's `whole`
    columns (one scale a group; a part of one value a row is kept whole). Raises
    ValueError where the cut would split a group or block."""
    parts = []
    for part in weight.parts:
        if part.dim() == 1:  # one value a row (int8's scale): the row's, whole
            parts.append(part)
            continue
        ratio = Fraction(part.shape[1], whole)
        start, count = first * ratio, width * ratio
        if start.denominator != 1 or count.denominator != 1:
            raise ValueError(f"a rank's {width} input columns of {whole} would split a "
                             f"quantization group or block of the {weight.layout} weight; "
                             "use fewer ranks")
        parts.append(part.narrow(1, int(start), int(count)).contiguous())
    return PrequantizedWeight(weight.layout, tuple(parts))


def add_parameter(layer: nn.Module, name: str, data: torch.Tensor, loader: WeightLoader,
                  filled_by: str | None = None) -> nn.Parameter:
    param = nn.Parameter(data, requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    if filled_by is not None:
        param.filled_by = filled_by  # type: ignore[attr-defined]
    layer.register_parameter(name, param)
    return param


def checked_copy(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy a checkpoint tensor into a parameter (or a shard's rows of one), converting
    its dtype."""
    if target.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, "
                         f"expected {tuple(target.shape)}")
    target.copy_(loaded)


def row_loader(layer: Linear) -> WeightLoader:
    """A loader that copies a shard into its rows of a parameter laid out by output row."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
        offset, size = layer.rows(shard)
        checked_copy(param.data.narrow(0, offset, size), loaded)

    return load


def add_bias(layer: Linear, bias: bool) -> None:
    """The layer's bias, kept unquantized in every method, or None."""
    if bias:
        add_parameter(layer, "bias", torch.empty(layer.out_features), row_loader(layer))
    else:
        layer.bias = None


# (layer, x, native ops or None) -> x @ dequantized(W).T + bias, in x's dtype.
Kernel = Callable[["Linear", torch.Tensor, "ModuleType | None"], torch.Tensor]


@dataclass(frozen=True)
class QuantizedKernel:
    """One way to compute a quantized layer's product, and where it can run."""

    run: Kernel
    devices: tuple[str, ...] = ("cpu", "cuda")  # the device types it runs on
    dtypes: tuple[torch.dtype, ...] | None = None  # the activation dtypes it takes; None: all
    native: bool = False  # kvflow's own: needs the native CPU kernels (a plan's ops)
    gemv: bool = False  # a kernel for a few rows, never chosen for large batches
    variants: bool = False  # reads the weight as its plan's GemvVariant says
    # Builds the layer's weight in the layout the kernel reads (it cannot read the layer's
    # parameters), kept in the layer's plan; it raises where the layer does not fit it.
    prepare: Callable[["Linear"], tuple[torch.Tensor, ...]] | None = None


# The activation dtypes whose models may run the kernels that quantize x to int8 per block
# (native_int8_activations): bf16 keeps 8 significant bits of each value, int8 per block of
# columns 7 of the block's largest, a rounding of the same order. A float32 model asks for
# float32 products, and gets them.
INT8_ACTIVATION_DTYPES = (torch.bfloat16,)


@dataclass(frozen=True)
class QuantizedPlan:
    """Which of a quantized method's kernels runs a layer on this device, chosen by
    measuring (kvflow/kernels/tuning.py): inputs of at most small_max_rows rows through
    the kernel named `small`, larger ones through the one named `large`. `weights` is the
    layer's copy in the layout of whichever of them has a `prepare`; `variant`, how a
    native GEMV among them reads the weight."""

    ops: ModuleType | None
    small: str
    small_max_rows: int
    large: str
    weights: tuple[torch.Tensor, ...] = ()
    variant: GemvVariant = DEFAULT


class QuantizedLinearMethod(LinearMethod):
    """A packed weight with several kernels that compute the same product. Without a plan
    (--enforce-eager, dtypes the native kernels lack) the layer runs the dequantize
    kernel, which works everywhere."""

    kernels: dict[str, QuantizedKernel]

    @abstractmethod
    def dequantize(self, layer: Linear) -> torch.Tensor:
        """The weight the packed parameters stand for, float32 [out_features, in_features]."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        plan = layer.plan
        if not isinstance(plan, QuantizedPlan) or x.dim() != 2:
            return dequantize_kernel(layer, x, None)
        name = plan.small if x.shape[0] <= plan.small_max_rows else plan.large
        return self.kernels[name].run(layer, x, plan.ops)


def dequantize_kernel(layer: Linear, x: torch.Tensor, ops: ModuleType | None) -> torch.Tensor:
    weight = layer.method.dequantize(layer).to(x.dtype)  # type: ignore[attr-defined]
    return F.linear(x, weight, layer.bias)


DEQUANTIZE = QuantizedKernel(dequantize_kernel)

# A dequantized weight that lives through one product is written into a buffer kept per
# thread and shape, up to this size: a fresh tensor that large may come from newly mapped
# memory whose pages fault in one by one, which measured costlier than dequantizing
# (all of qwen2.5-0.5b's decoder weights at 16 rows: 205 ms fresh, 73-87 ms reused).
DEQUANTIZE_BUFFER_MAX_BYTES = 64 * 2**20
_dequantize_buffers = threading.local()


def dequantize_buffer(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor | None:
    """This thread's buffer for a dequantized CPU weight of `shape`, or None above the
    size limit (the caller allocates)."""
    if shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size() > \
            DEQUANTIZE_BUFFER_MAX_BYTES:
        return None
    buffers = _dequantize_buffers.__dict__.setdefault("by_shape", {})
    key = (shape, dtype)
    if key not in buffers:
        buffers[key] = torch.empty(shape, dtype=dtype)
    return buffers[key]


def quantized_parts(loaded: torch.Tensor | PrequantizedWeight,
                    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], layout: str,
                    shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The parts (packed values, scales, ...) of a checkpoint weight of `shape` ([..., rows,
    columns]) in a quantized layout: a `PrequantizedWeight`'s as they are, or a
    floating-point weight's quantized row by row, all its rows as one [rows, columns]
    matrix."""
    if isinstance(loaded, PrequantizedWeight):
        if loaded.layout != layout:
            raise ValueError(f"a {loaded.layout} weight cannot load into a {layout} layer")
        return loaded.parts
    if tuple(loaded.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, "
                         f"expected {tuple(shape)}")
    if not loaded.is_floating_point():
        raise ValueError(f"quantizing at load needs a floating-point checkpoint "
                         f"weight, got {loaded.dtype}")
    return quantize(loaded.to(device).reshape(-1, shape[-1]))


def quantized_rows_loader(layer: Linear, quantize: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
                          targets: tuple[str, ...], layout: str) -> WeightLoader:
    """A loader for a quantized weight: it quantizes a shard of the checkpoint's
    floating-point weight, or takes a `PrequantizedWeight` in `layout` as it is, and writes
    the parts (packed values, scales, ...) into the shard's rows of the layer's parameters
    named in `targets`, in the order `quantize` returns them."""

    def load(param: nn.Parameter, loaded: torch.Tensor | PrequantizedWeight,
             shard: str | None) -> None:
        offset, size = layer.rows(shard)
        parts = quantized_parts(loaded, quantize, layout, (size, layer.in_features),
                                param.device)
        for name, part in zip(targets, parts, strict=True):
            checked_copy(getattr(layer, name).data.narrow(0, offset, size), part)

    return load
