"""vLLM options kvflow does not have, each with what to do instead, so that a vLLM user's
command line or script stops with a reason rather than argparse's bare "unrecognized
arguments" or Python's "unexpected keyword argument"."""
from __future__ import annotations

import re

MISSING: dict[str, str] = {
    "kv_cache_dtype": "the KV cache is kept in the model's dtype (--dtype)",
    "load_format": "kvflow reads safetensors checkpoints and GGUF files, whichever the model "
                   "path is: drop the flag",
    "tokenizer_mode": "kvflow uses the checkpoint's fast (tokenizers) tokenizer",
    "speculative_model": "vLLM's older flag: use --speculative-config "
                         "'{\"model\": PATH, \"num_speculative_tokens\": 4}'",
    "num_speculative_tokens": "vLLM's older flag: use --speculative-config "
                              "'{\"method\": ..., \"num_speculative_tokens\": 4}'",
    "enable_lora": "LoRA adapters are not supported; merge the adapter into the weights",
    "lora_modules": "LoRA adapters are not supported; merge the adapter into the weights",
    "max_loras": "LoRA adapters are not supported",
    "max_lora_rank": "LoRA adapters are not supported",
    "chat_template_content_format": "message content is passed to the template as a string",
    "guided_decoding_backend": "structured output always uses llguidance, which refuses the "
                               "schema features it cannot enforce: drop the flag",
    "structured_outputs_config": "structured output always uses llguidance, which refuses the "
                                 "schema features it cannot enforce: drop the flag",
    "swap_space": "preempted requests are recomputed, never swapped to host memory",
    "preemption_mode": "preemption is always by recompute",
    "cpu_offload_gb": "weights are not offloaded; on a CPU they are in RAM already "
                      "(--device cpu)",
    "distributed_executor_backend": "kvflow runs a model in one process on one device",
    "enable_expert_parallel": "mixture-of-experts models are not supported yet",
    "limit_mm_per_prompt": "kvflow serves text-only models",
    "mm_processor_kwargs": "kvflow serves text-only models",
    "ssl_keyfile": "put a TLS-terminating proxy (nginx, Caddy) in front of kvflow",
    "ssl_certfile": "put a TLS-terminating proxy (nginx, Caddy) in front of kvflow",
    "ssl_ca_certs": "put a TLS-terminating proxy (nginx, Caddy) in front of kvflow",
    "root_path": "serve behind a proxy that strips the path prefix",
    "uds": "kvflow listens on TCP only (--host, --port)",
    "middleware": "kvflow loads no code from its command line",
    "max_seq_len_to_capture": "kvflow's CUDA graphs serve contexts of any length up to "
                              "--max-model-len: drop the flag",
    "compilation_config": "kvflow does not use torch.compile; --enforce-eager turns off its "
                          "native kernels",
    "enable_chunked_prefill": "prefill is always chunked in kvflow: drop the flag "
                              "(--max-num-batched-tokens sets the chunk)",
    "max_num_partial_prefills": "every prompt that fits the step's token budget is prefilled "
                                "in it",
    "disable_sliding_window": "sliding windows follow the checkpoint's config",
    "disable_frontend_multiprocessing": "kvflow's server and engine always share one process",
    "api_server_count": "kvflow runs one API server process; run several behind a load "
                        "balancer",
    "enable_sleep_mode": "sleep mode is not supported",
    "hf_overrides": "edit the checkpoint's config.json instead",
    "max_log_len": "--enable-log-requests never logs prompt text",
}

# The rest of `vllm serve`'s flags (vLLM 0.11 and 0.12), by why kvflow lacks them.
_ONE_PROCESS = ("kvflow splits a model only by tensor and pipeline parallelism, with its "
                "own collectives")
_DP_ONE_MACHINE = ("kvflow's engine cores (-dp) run on one machine behind its API server; "
                   "across machines, run a server per machine behind SGLang's router")
_TEXT_ONLY = "kvflow serves text-only models"
_NO_CODE = "kvflow loads no code from its command line"
_LOADER = "kvflow loads safetensors checkpoints and GGUF files its own way: drop the flag"
_MOE = ("kvflow has no expert parallelism or expert load balancing: under -tp each expert is "
        "split as the MLP is")
_LORA = "LoRA adapters are not supported; merge the adapter into the weights"
_BY_REASON: dict[str, tuple[str, ...]] = {
    _ONE_PROCESS: (
        "decode_context_parallel_size", "dcp_kv_cache_interleave_size",
        "cp_kv_cache_interleave_size", "prefill_context_parallel_size",
        "ray_workers_use_nsight", "disable_custom_all_reduce", "max_parallel_loading_workers",
        "aggregate_engine_logging", "enable_dbo", "dbo_decode_token_threshold",
        "dbo_prefill_token_threshold"),
    _DP_ONE_MACHINE: (
        "data_parallel_rank", "data_parallel_start_rank", "data_parallel_size_local",
        "data_parallel_address", "data_parallel_rpc_port", "data_parallel_backend",
        "data_parallel_hybrid_lb", "data_parallel_external_lb",
        "disable_nccl_for_dp_synchronization"),
    _MOE: ("all2all_backend", "enable_eplb", "eplb_config", "expert_placement_strategy",
           "num_redundant_experts", "eplb_window_size", "eplb_step_interval",
           "eplb_log_balancedness"),
    _TEXT_ONLY: (
        "allowed_local_media_path", "allowed_media_domains", "enable_mm_embeds",
        "media_io_kwargs", "mm_processor_cache_gb", "disable_mm_preprocessor_cache",
        "mm_processor_cache_type", "mm_shm_cache_max_object_size_mb", "mm_encoder_tp_mode",
        "mm_encoder_attn_backend", "interleave_mm_strings", "skip_mm_profiling",
        "video_pruning_rate", "enable_multimodal_encoder_data_parallel",
        "disable_chunked_mm_input", "default_mm_loras", "ec_transfer_config"),
    _LORA: ("lora_dtype", "max_cpu_loras", "fully_sharded_loras", "enable_lora_bias",
            "lora_extra_vocab_size"),
    "kvflow serves generative (causal LM) models only, not embedding, classification or "
    "reward models": ("runner", "convert", "task", "pooler_config", "override_pooler_config"),
    _NO_CODE: ("tool_parser_plugin", "reasoning_parser_plugin", "logits_processors",
               "logits_processor_pattern", "io_processor_plugin", "scheduler_cls",
               "worker_cls", "worker_extension_cls"),
    "kvflow runs its own implementation of each architecture it supports": ("model_impl",),
    "put a TLS-terminating proxy (nginx, Caddy) in front of kvflow": (
        "enable_ssl_refresh", "ssl_cert_reqs"),
    "kvflow does not use torch.compile: --enforce-eager turns its kernels and CUDA graphs "
    "off": ("optimization_level",),
    "the KV cache stays on the model's device: no transfer, offloading or events": (
        "kv_transfer_config", "kv_events_config", "kv_offloading_size",
        "kv_offloading_backend"),
    _LOADER: ("safetensors_load_strategy", "model_loader_extra_config", "ignore_patterns",
              "pt_load_map_location", "use_tqdm_on_load"),
    "kvflow takes its options on the command line only": ("config",),
    "give a checkpoint directory (or GGUF file) whose config.json kvflow reads": (
        "hf_config_path", "config_format"),
    "kvflow never runs a checkpoint's code (see --trust-remote-code)": ("code_revision",),
    "set HF_TOKEN in the environment; huggingface_hub reads it": ("hf_token",),
    "kvflow needs the tokenizer, for stop strings and text": ("skip_tokenizer_init",),
    "prompts are text or token ids": ("enable_prompt_embeds",),
    "attention runs in the model's dtype (--dtype)": ("override_attention_dtype",),
    "RoPE follows the checkpoint's config.json: edit it there": ("rope_scaling", "rope_theta"),
    "kvflow has no cascade attention": ("disable_cascade_attn",),
    "logprobs are the model's own log-softmax, vLLM's default mode": ("logprobs_mode",),
    "size the KV cache with --kv-cache-memory or --gpu-memory-utilization": (
        "num_gpu_blocks_override",),
    "prefix-cache blocks are keyed by a hash of their exact token ids, chained": (
        "prefix_caching_hash_algo",),
    "the KV cache is kept in the model's dtype (--dtype)": ("calculate_kv_scales",),
    "kvflow serves transformer models: no Mamba state or KV-sharing layers": (
        "kv_sharing_fast_prefill", "mamba_cache_dtype", "mamba_ssm_cache_dtype",
        "mamba_block_size"),
    "every prompt that fits the step's token budget is prefilled in it": (
        "max_long_partial_prefills", "long_prefill_token_threshold"),
    "one KV cache manager serves every layer, sliding windows included": (
        "disable_hybrid_kv_cache_manager",),
    "streams send every step's tokens as they come": ("stream_interval",),
    "speculative decoding sizes its lookahead slots from --speculative-config": (
        "num_lookahead_slots",),
    "kvflow logs no periodic statistics (/metrics has them): drop the flag": (
        "disable_log_stats",),
    "kvflow hides no metrics: drop the flag": ("show_hidden_metrics_for_version",),
    "tracing is not supported; /metrics has the request timings": (
        "otlp_traces_endpoint", "collect_detailed_traces"),
    "/metrics has kv_cache_usage_perc; residency sampling is not supported": (
        "kv_cache_metrics", "kv_cache_metrics_sample"),
    "a chat template comes from the checkpoint or --chat-template, never from a request": (
        "trust_request_chat_template",),
    "logprob tokens are returned as text": ("return_tokens_as_token_ids",),
    "responses carry no X-Request-Id header": ("enable_request_id_headers",),
    "tool definitions always reach the chat template": (
        "exclude_tools_when_tool_choice_none",),
    "built-in tool servers are not supported": ("tool_server",),
    "--log-level sets kvflow's logging; run it under your own logging setup otherwise": (
        "log_config_file", "log_error_stack"),
    "GET /load always reports the requests in flight: drop the flag": (
        "enable_server_load_tracking",),
    "ask for usage per request (stream_options.include_usage)": (
        "enable_force_include_usage",),
    "/tokenizer_info is not served": ("enable_tokenizer_info_endpoint",),
    "--enable-log-requests never logs prompt or output text": ("enable_log_outputs",),
    "the server's own limits apply: --max-request-body-bytes and the timeouts": (
        "h11_max_incomplete_event_size", "h11_max_header_count"),
    "the tokens-only endpoint of disaggregated serving is not supported": ("tokens_only",),
    "structured output always uses llguidance, which refuses the schema features it cannot "
    "enforce: drop the flag": ("guided_decoding_disable_fallback",
                               "guided_decoding_disable_any_whitespace",
                               "guided_decoding_disable_additional_properties"),
    "vLLM's platform-specific options do not apply to kvflow": ("additional_config",),
}
MISSING.update({flag: why for why, flags in _BY_REASON.items() for flag in flags})

# vLLM's short spellings of flags kvflow lacks (-O3 is -O with its level).
ALIASES = {"asc": "api_server_count",
           "dcp": "decode_context_parallel_size", "pcp": "prefill_context_parallel_size",
           "dpn": "data_parallel_rank", "dpr": "data_parallel_start_rank",
           "dpl": "data_parallel_size_local", "dpa": "data_parallel_address",
           "dpp": "data_parallel_rpc_port", "dpb": "data_parallel_backend",
           "dph": "data_parallel_hybrid_lb", "dpe": "data_parallel_external_lb",
           "cc": "compilation_config", "O": "optimization_level"}


def refusal(option: str) -> str | None:
    """Why kvflow lacks the vLLM option (given as --flag-name, --no-flag-name or
    flag_name), or None when vLLM has no such option either."""
    name = option.lstrip("-").split("=", 1)[0].replace("-", "_")
    if option.startswith("-") and not option.startswith("--"):
        name = ALIASES.get(re.sub(r"^O\d*$", "O", name), name)
    why = MISSING.get(name) or (MISSING.get(name[3:]) if name.startswith("no_") else None)
    if why is None:
        return None
    spelled = f"--{name.replace('_', '-')}" if option.startswith("-") else name
    return f"{spelled} is a vLLM option kvflow does not have: {why}"
