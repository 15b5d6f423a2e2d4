"""Find a checkpoint (local directory or hub id) and load its safetensors into our modules."""
from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from kvflow.distributed.pipeline import elsewhere
from kvflow.distributed.tensor_parallel import current
from kvflow.layers.linear import Linear
from kvflow.layers.moe_placement import ExpertPlacement, placing_experts
from kvflow.models.blocks import CausalLM
from kvflow.models.config import ModelConfig
from kvflow.models.gguf import GgufFile, is_gguf
from kvflow.models.gguf.weights import gguf_tensors, plan_gguf
from kvflow.models.registry import family_for
from kvflow.quantization.base import PrequantizedWeight, QuantizationConfig, checked_copy
from kvflow.quantization.gptq_awq import (check_quantization_flag, plan_checkpoint,
                                          prequantized_tensors)
from kvflow.worker import huge_pages

logger = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_model_path(model: str, revision: str | None = None,
                       download_dir: str | None = None) -> Path:
    """A local directory or GGUF file as it is; anything else is fetched from the Hugging
    Face Hub (at `revision`, into `download_dir` or the Hugging Face cache)."""
    local = Path(model).expanduser()
    if is_gguf(local):
        if not local.is_file():
            raise ValueError(f"GGUF file {model!r} does not exist")
        return local
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ValueError(f"model directory {local} has no config.json")
        return local
    if model.startswith(("/", "./", "../", "~")) or local.exists():
        raise ValueError(f"model path {model!r} is not a directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, cache_dir=download_dir,
                                      allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for users
        raise ValueError(
            f"model {model!r} could not be found locally or downloaded from the Hugging Face "
            f"Hub ({type(exc).__name__}: {exc}). If this machine is offline, download the "
            "checkpoint elsewhere and pass the path of its directory (config.json, tokenizer "
            "files and *.safetensors)."
        ) from exc


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Layers made inside this take `dtype` for their unpacked parameters."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(config: ModelConfig, dtype: torch.dtype, device: torch.device,
               max_positions: int, quant_config: QuantizationConfig | None = None,
               lm_head_quant_config: QuantizationConfig | None = None,
               placement: ExpertPlacement | None = None) -> CausalLM:
    """The registered family's model with the checkpoint's weights (kernels are installed
    by kvflow/models/builder.py). quant_config: quantize a float checkpoint at load; a GGUF file's layers take the
    formats its tensors are in (kvflow/models/gguf/weights.py), and a GPTQ or AWQ
    checkpoint's quantized layers load as int4 (kvflow/quantization/gptq_awq.py).
    lm_head_quant_config: the LM head's format, quantized at load from whatever float
    weight the checkpoint has for it (None: the model's dtype). placement: expert layers
    whose weights go to another device than the model's (kvflow/layers/moe_placement.py)."""
    path = Path(config.path)
    model_class = family_for(config.architecture).model_class
    gguf = GgufFile(path) if is_gguf(path) else None
    check_quantization_flag(quant_config, config.quantization, str(path))
    # A GGUF file's tensors are read against the whole model, not a rank's share of it.
    file_config = config if current().size == 1 else ModelConfig.from_pretrained(path)
    if gguf is not None:
        if quant_config is not None:
            raise ValueError(f"quantization={quant_config.name!r} quantizes a float "
                             "checkpoint at load; a GGUF file's weights keep the formats "
                             "they are stored in")
        quant_config = plan_gguf(gguf, file_config, dtype, model_class.packed_modules)
    elif config.quantization is not None:
        quant_config = plan_checkpoint(config.quantization, _safetensors_shapes(path),
                                       model_class.packed_modules)
    with torch.device(device), default_dtype(dtype), placing_experts(placement):
        model = model_class(config, max_positions, quant_config, lm_head_quant_config)
    # Before a byte is loaded, so that the weights' pages fault in huge.
    huge_pages.gather(model.parameters())
    if gguf is not None:
        load_weights(model, gguf_tensors(gguf, file_config, quant_config, dtype),
                     gguf.path.name)
    elif config.quantization is not None:
        load_weights(model, prequantized_tensors(config.quantization, _safetensors_tensors(path),
                                                 dtype, str(path)), str(path))
    else:
        load_weights(model, _safetensors_tensors(path), str(path))
    return model.eval().requires_grad_(False)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {path}")
    return files


def _safetensors_shapes(path: Path) -> Iterator[tuple[str, tuple[int, ...]]]:
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, tuple(f.get_slice(key).get_shape())


def _safetensors_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def load_weights(model: CausalLM,
                 tensors: Iterable[tuple[str, torch.Tensor | PrequantizedWeight]],
                 source: str) -> None:
    """Hand each checkpoint tensor (Hugging Face name, tensor in its own dtype or already
    in a quantized layout) to its parameter's weight_loader, which converts, quantizes or
    packs it as the parameter's method stores it. `source` names the checkpoint in
    errors."""
    params = dict(model.named_parameters())
    other_stages = elsewhere(model)
    expected: set[tuple[str, str | None]] = set()
    for name, param in params.items():
        if hasattr(param, "filled_by"):
            continue
        shards = (getattr(param, "shards", None)
                  or getattr(_owner(model, name), "shard_offsets", None) or [None])
        expected.update((name, shard) for shard in shards)
    loaded: set[tuple[str, str | None]] = set()
    tied = model.config.tie_word_embeddings
    for key, tensor in model.checkpoint_tensors(tensors):
        if key.endswith(_IGNORED_SUFFIXES) or (tied and key == "lm_head.weight"):
            continue
        if tied and isinstance(model.lm_head, Linear) and key == "model.embed_tokens.weight":
            # A tied head in a format of its own: a second copy, made from the embedding.
            model.lm_head.weight.weight_loader(
                model.lm_head.weight, model.lm_head.rank_part(tensor, None, "weight"), None)
            loaded.add(("lm_head.weight", None))
        name, shard = _map_name(key, model.packed_modules, model.expert_projections)
        if _held_by(name, other_stages):
            continue  # another pipeline stage's layer
        if name not in params:
            raise ValueError(f"checkpoint tensor {key!r} in {source} matches no "
                             f"parameter of {model.config.architecture}")
        param = params[name]
        loader = getattr(param, "weight_loader", _default_weight_loader)
        owner = _owner(model, name)
        try:
            if getattr(owner, "tp_split", None) is not None:  # a tensor-parallel rank's part
                tensor = owner.rank_part(tensor, shard, name.rsplit(".", 1)[-1])
            loader(param, tensor, shard)
        except ValueError as exc:
            raise ValueError(f"checkpoint tensor {key!r} in {source}: {exc}") from exc
        loaded.update((n, s) for n, s in expected if n == name and _covers(shard, s))
        loaded.add((name, shard))
    missing = sorted(f"{n}[{s}]" if s else n for n, s in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint {source} lacks {len(missing)} tensors, e.g. {missing[:5]}")


def _default_weight_loader(param: nn.Parameter, loaded: torch.Tensor,
                           shard: str | None) -> None:
    checked_copy(param.data, loaded)


def _covers(loaded: str | None, shard: str | None) -> bool:
    """Whether a tensor loaded as shard `loaded` fills `shard`: None is the whole parameter
    (a checkpoint that stores a fused layer whole, as Phi-3's qkv_proj), and a shard
    covers its parts, named "shard:part" (stacked experts' "gate" covers "gate:3")."""
    return loaded is None or shard == loaded or (shard or "").startswith(f"{loaded}:")


# A tensor of one expert, or without the expert's index one projection of every expert
# stacked (a GGUF file's ffn_gate_exps, read as `experts.gate_proj.weight`): (the expert
# layer's name, expert or None, projection, weight or bias)
_EXPERT_KEY = re.compile(r"(.+\.experts)(?:\.(\d+))?\.(\w+)\.(weight|bias)")


def _map_name(key: str, packed: dict[str, tuple[str, str]],
              experts: dict[str, str]) -> tuple[str, str | None]:
    """A checkpoint tensor's parameter and shard: an expert's projection (named in
    `experts`) goes to its expert layer's stacked parameter, as that expert's shard
    ("gate:3") or, stacked, every expert's ("gate"); a projection that is part of a fused
    layer (named in `packed`) goes to that layer's shard."""
    match = _EXPERT_KEY.fullmatch(key)
    if match and match[3] in experts:
        projection = experts[match[3]]
        param = "down_proj" if projection == "down" else "gate_up_proj"
        suffix = "" if match[4] == "weight" else "_bias"
        shard = projection if match[2] is None else f"{projection}:{match[2]}"
        return f"{match[1]}.{param}{suffix}", shard
    for checkpoint_name, (fused_name, shard) in packed.items():
        part = f".{checkpoint_name}."
        if part in key:
            return key.replace(part, f".{fused_name}."), shard
    return key, None


def _held_by(param_name: str, modules: set[str]) -> bool:
    """Whether the parameter belongs to one of `modules` (names of modules)."""
    parts = param_name.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0])
