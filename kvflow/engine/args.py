"""The user-facing engine options, shared by LLM(...), LLMEngine and the CLI."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch

from kvflow.attention.selector import BACKEND_NAMES
from kvflow.config import SchedulerConfig, parse_dtype, parse_memory, parse_token_count
from kvflow.demo import demo_model_path
from kvflow.distributed.group import ParallelConfig
from kvflow.engine.generation_config import parse_override
from kvflow.spec_decode.config import SpeculativeConfig
from kvflow.quantization import quantization_config
from kvflow.worker.cuda_graphs import capture_sizes

DEVICES = ("auto", "cpu", "cuda")

_FLAG_HELP = {
    "tokenizer": "tokenizer directory or hub id (default: the model's)",
    "dtype": "auto (the checkpoint's), bfloat16, float16 or float32",
    "device": "auto (CUDA when available), cpu or cuda",
    "max_model_len": "longest prompt plus output, e.g. 4096, 32k (32,000) or 32K (32,768) "
                     "(default: max_position_embeddings)",
    "block_size": "tokens per KV cache block",
    "kv_cache_memory": "KV cache budget, bytes or e.g. 2GiB (default on the CPU: room for "
                       "min(max_num_seqs, 4) sequences of max_model_len tokens, at most "
                       "min(4GiB, 1/4 of free RAM); on CUDA 80%% of free memory)",
    "max_num_seqs": "most requests running at once",
    "max_num_batched_tokens": "token budget of one step; longer prompts are chunked",
    "scheduling_policy": "fcfs, priority (lower priority value runs first) or lpm (longest "
                         "cached prefix first, aged so that none starves)",
    "enable_prefix_caching": "reuse the KV cache of prompt prefixes already computed "
                             "(default: on)",
    "seed": "seed of the engine's sampler, used by requests without a seed of their own",
    "attention_backend": "auto (the fastest for the device), torch (the PyTorch reference), "
                         "cpu (kvflow's native CPU kernels) or triton (kvflow's Triton "
                         "kernels, for CUDA)",
    "batch_invariant": "make a request's logits, logprobs and tokens bitwise the same "
                       "whatever else is in its batch, however its prompt is chunked, with "
                       "or without a prefix-cache hit or speculative decoding (the CPU's "
                       "native kernels, each row reduced in one fixed order; see the README "
                       "for its cost)",
    "num_threads": "CPU threads (default: one per physical core, or OMP_NUM_THREADS)",
    "cuda_graph_sizes": "the decode batch sizes captured (CUDA graphs on CUDA, the native "
                        "kernels' recorded calls on the CPU): one value N for 1, 2, 4, 8, "
                        "16, ... up to N, several for those sizes (default: up to "
                        "min(max_num_seqs, 512) on CUDA, 16 on the CPU)",
    "max_cudagraph_capture_size": "the largest decode batch captured (default 512 on CUDA, "
                                  "16 on the CPU)",
    "async_scheduling": "form and submit each step while the one before it runs, its "
                        "requests' new tokens read on the device (steps whose requests use "
                        "penalties, bad words, logprobs, structured output or speculation "
                        "run in turn); outputs as without it",
    "enforce_eager": "PyTorch's own ops only: no native kernels (they are compiled once per "
                     "machine and cached)",
    "quantization": "quantize the decoder's linear weights at load, from a bf16, fp16 or fp32 "
                    "checkpoint: int8 (per output channel, symmetric) or int4 (group-wise, "
                    "asymmetric); weight-only, and the embedding and LM head stay in the "
                    "checkpoint's dtype (default: none)",
    "quantization_group_size": "input columns per int4 scale, a multiple of 32 dividing every "
                               "layer's input size",
    "quantize_lm_head": "run the LM head in int8 (per output channel, quantized at load from "
                        "the checkpoint's head, or from the embedding when they are tied; the "
                        "embedding's lookups keep its own dtype), with any weight format; "
                        "the head is a large share of a small model's bytes per token",
    "kv_cache_memory_bytes": "vLLM's name for --kv-cache-memory",
    "gpu_memory_utilization": "on CUDA, the fraction of the device's memory for weights, "
                              "activations and KV cache (as vLLM); on the CPU, the fraction of "
                              "available RAM for the KV cache. --kv-cache-memory overrides it",
    "tensor_parallel_size": "ranks the model is split across (tensor parallelism: each "
                            "holds a shard of every layer, in a process of its own, with "
                            "its own cores on the CPU; default 1)",
    "nnodes": "machines the ranks run on (each runs tensor_parallel_size x "
              "pipeline_parallel_size / nnodes of them; the others with --headless)",
    "node_rank": "this machine's index among nnodes (0 runs the API server and rank 0)",
    "master_addr": "the address of node 0, where ranks meet (default 127.0.0.1)",
    "master_port": "the port on node 0 where ranks meet (default: a free one, one machine "
                   "only)",
    "distributed_timeout": "seconds for a rank to join at startup, and for any collective "
                           "before its rank is declared failed (SGLang's --dist-timeout); "
                           "under data parallelism, also how long an engine core may send "
                           "nothing before it is declared hung and killed",
    "pipeline_parallel_size": "pipeline stages the layers are split across (each holds a "
                              "range of layers and their KV, in processes of its own; one "
                              "batch per stage in flight; default 1)",
    "data_parallel_size": "engine cores, each a copy of the model in a process of its own "
                          "with its own cores, behind one API server that routes each "
                          "request to the core holding its longest cached prefix (kvflow "
                          "serve only; default 1)",
    "trust_remote_code": "accepted and ignored: kvflow runs its own model code, never a "
                         "checkpoint's",
    "download_dir": "where hub downloads go (default: the Hugging Face cache)",
    "revision": "hub revision (branch, tag or commit) of the model",
    "tokenizer_revision": "hub revision of the tokenizer (default: --revision)",
    "speculative_config": "speculative decoding, as a JSON object in vLLM's spelling: "
                          "'{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
                          "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}' or "
                          "'{\"method\": \"draft_model\", \"model\": PATH, "
                          "\"num_speculative_tokens\": 4}'; also disable_by_batch_size "
                          "and min_acceptance_rate",
    "generation_config": "sampling defaults for requests that leave a field unset: auto "
                         "(temperature, top_p, top_k, min_p, repetition_penalty and "
                         "max_new_tokens from the checkpoint's generation_config.json), vllm "
                         "(none: SamplingParams' own) or a folder with a "
                         "generation_config.json",
    "override_generation_config": "sampling defaults on top of --generation-config, as a "
                                  "JSON object in generation_config.json's keys, e.g. "
                                  "'{\"temperature\": 0.6, \"max_new_tokens\": 512}'",
    "cpu_moe": "keep every mixture-of-experts layer's expert weights in host memory and "
               "compute them on the CPU, the rest of the model on the GPU (llama.cpp's "
               "--cpu-moe); changes nothing where the model runs on the CPU",
    "n_cpu_moe": "the same for the expert layers among the model's first N layers only "
                 "(llama.cpp's --n-cpu-moe)",
    "max_logprobs": "most logprobs (and prompt_logprobs) a request may ask for; -1: no "
                    "limit (a request's logprobs=-1 is the whole vocabulary)",
}

def _token_count_flag(value: str) -> int:
    try:
        return parse_token_count(value)
    except ValueError as exc:  # argparse shows this message instead of its generic one
        raise argparse.ArgumentTypeError(str(exc)) from None


_FLAG_TYPES = {"max_model_len": _token_count_flag, "block_size": int, "max_num_seqs": int,
               "max_num_batched_tokens": int, "seed": int, "num_threads": int,
               "gpu_memory_utilization": float, "tensor_parallel_size": int,
               "pipeline_parallel_size": int, "data_parallel_size": int, "max_logprobs": int,
               "quantization_group_size": int, "n_cpu_moe": int, "nnodes": int,
               "node_rank": int, "master_port": int, "distributed_timeout": float,
               "cuda_graph_sizes": int, "max_cudagraph_capture_size": int}
_FLAG_NARGS = {"cuda_graph_sizes": "+"}
_FLAG_ALIASES = {"cuda_graph_sizes": ["--cudagraph-capture-sizes"],
                 "tensor_parallel_size": ["-tp"], "pipeline_parallel_size": ["-pp"],
                 "data_parallel_size": ["-dp"], "quantization": ["-q"], "nnodes": ["-n"],
                 "node_rank": ["-r"]}
@dataclass
class EngineArgs:
    model: str | None = None  # None: the shipped demo model (kvflow/assets/demo)
    tokenizer: str | None = None  # defaults to the model's directory
    dtype: str = "auto"  # auto (the checkpoint's) | bfloat16 | float16 | float32
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda
    max_model_len: int | None = None  # defaults to max_position_embeddings
    block_size: int = 16
    kv_cache_memory: int | str | None = None  # bytes or "2GiB"; None: see worker/kv_cache.py
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    scheduling_policy: str = "fcfs"  # fcfs | priority | lpm (longest cached prefix first)
    enable_prefix_caching: bool = True  # reuse the KV of prefixes already computed
    seed: int = 0
    attention_backend: str = "auto"  # auto (the fastest for the device) | torch | cpu | triton
    enforce_eager: bool = False  # True: PyTorch ops only, no compiled native kernels
    # form step n+1 while step n runs (vLLM's --async-scheduling; kvflow/engine/llm_engine.py)
    async_scheduling: bool = False
    # CUDA graphs of decode steps (kvflow/worker/cuda_graphs.py): vLLM's two options
    cuda_graph_sizes: list[int] | None = None
    max_cudagraph_capture_size: int | None = None
    batch_invariant: bool = False  # a row's arithmetic independent of its batch (README)
    num_threads: int | None = None  # CPU threads; None: one per physical core (worker/threads.py)
    quantization: str | None = None  # None | int8 | int4 (kvflow/quantization/)
    quantization_group_size: int = 128  # int4's columns per scale
    quantize_lm_head: bool = False  # the LM head in int8, whatever the decoder's format
    # Experts in host memory, computed by the CPU (kvflow/layers/moe_placement.py): every
    # expert layer's, or those among the first n_cpu_moe layers.
    cpu_moe: bool = False
    n_cpu_moe: int | None = None
    # vLLM's names, so that a vLLM user's arguments carry over.
    kv_cache_memory_bytes: int | str | None = None  # same as kv_cache_memory
    gpu_memory_utilization: float | None = None  # see worker/kv_cache.py
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    # Where ranks meet (kvflow/distributed/group.py), as torchrun and SGLang spell it.
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port, on one machine
    distributed_timeout: float = 300.0
    trust_remote_code: bool = False  # ignored, with a warning: kvflow runs no remote code
    download_dir: str | None = None
    revision: str | None = None
    tokenizer_revision: str | None = None
    max_logprobs: int = 20
    # JSON text, a dict or a SpeculativeConfig; parsed into a SpeculativeConfig
    speculative_config: str | dict | SpeculativeConfig | None = None
    generation_config: str = "auto"  # auto | vllm | a folder (engine/generation_config.py)
    # JSON text or a dict in generation_config.json's keys; parsed into a dict
    override_generation_config: str | dict | None = None

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = str(demo_model_path())
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.attention_backend not in BACKEND_NAMES:
            raise ValueError(f"attention_backend must be one of {BACKEND_NAMES}, "
                             f"got {self.attention_backend!r}")
        quantization_config(self.quantization, self.quantization_group_size)
        if self.batch_invariant and (self.enforce_eager
                                     or self.attention_backend in ("torch", "triton")):
            raise ValueError("batch_invariant runs kvflow's native CPU kernels: it cannot be "
                             "combined with enforce_eager or attention_backend="
                             f"{self.attention_backend!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {self.num_threads}")
        capture_sizes(self.max_num_seqs, self.cuda_graph_sizes, self.max_cudagraph_capture_size)
        if self.async_scheduling and (self.speculative_config is not None
                                      or self.tensor_parallel_size > 1
                                      or self.pipeline_parallel_size > 1):
            raise ValueError("async_scheduling runs one rank without speculative decoding: "
                             "it cannot be combined with speculative_config, "
                             "tensor_parallel_size or pipeline_parallel_size")
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if self.max_model_len is not None:
            self.max_model_len = parse_token_count(self.max_model_len)
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")
        if self.kv_cache_memory_bytes is not None:
            bytes_ = parse_memory(self.kv_cache_memory_bytes, "kv_cache_memory_bytes")
            if self.kv_cache_memory is not None and parse_memory(self.kv_cache_memory) != bytes_:
                raise ValueError("kv_cache_memory and kv_cache_memory_bytes are one option; "
                                 "give one of them")
            self.kv_cache_memory = self.kv_cache_memory_bytes = bytes_
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_memory(self.kv_cache_memory)
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be at least 1, "
                             f"got {self.data_parallel_size}")
        if self.data_parallel_size > 1 and self.nnodes > 1:
            raise ValueError(f"data_parallel_size={self.data_parallel_size} with nnodes="
                             f"{self.nnodes}: engine cores run on this machine only; run a "
                             "server per machine behind SGLang's router instead (README)")
        self.parallel_config()  # checked now, not after the weights are loaded
        if self.n_cpu_moe is not None and self.n_cpu_moe < 0:
            raise ValueError(f"n_cpu_moe must be at least 0, got {self.n_cpu_moe}")
        if self.cpu_moe and self.n_cpu_moe is not None:
            raise ValueError("cpu_moe (every expert layer) and n_cpu_moe (the first N "
                             "layers') are alternatives; give one of them")
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be -1 (no limit) or at least 0, "
                             f"got {self.max_logprobs}")
        if self.speculative_config is not None:
            self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if not self.generation_config:
            raise ValueError("generation_config must be auto, vllm or a folder")
        self.override_generation_config = parse_override(self.override_generation_config)
        # Checked now rather than after the weights are loaded.
        SchedulerConfig(max_num_seqs=self.max_num_seqs,
                        max_num_batched_tokens=self.max_num_batched_tokens,
                        policy=self.scheduling_policy)

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size,
                              self.nnodes, self.node_rank, self.master_addr, self.master_port,
                              self.distributed_timeout)

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but torch sees no CUDA device")
        return torch.device(self.device)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """One flag per field (--max-model-len for max_model_len, and so on), defined here so
        that every command (serve, generate, bench) takes the same engine options."""
        defaults = EngineArgs(model="")
        for field in dataclasses.fields(EngineArgs):
            if field.name == "model":
                continue
            flags = [f"--{field.name.replace('_', '-')}", *_FLAG_ALIASES.get(field.name, [])]
            default = getattr(defaults, field.name)
            if isinstance(default, bool):
                # A switch on by default also gets its --no- form (vLLM's spelling).
                action = argparse.BooleanOptionalAction if default else "store_true"
                parser.add_argument(*flags, dest=field.name, action=action, default=default,
                                    help=_FLAG_HELP[field.name])
                continue
            parser.add_argument(*flags, dest=field.name, type=_FLAG_TYPES.get(field.name, str),
                                nargs=_FLAG_NARGS.get(field.name), default=default,
                                help=_FLAG_HELP[field.name])
        return parser

    @classmethod
    def from_cli_args(cls, namespace: argparse.Namespace) -> EngineArgs:
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(namespace).items() if k in names})
