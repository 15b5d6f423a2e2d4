"""vLLM options kvflow does not have, each with what to do instead, so that a vLLM user's
command line or script stops with a reason rather than argparse's bare "unrecognized
arguments" or Python's "unexpected keyword argument"."""
from __future__ import annotations

_NOT_YET = "not built yet"

MISSING: dict[str, str] = {
    "kv_cache_dtype": "the KV cache is kept in the model's dtype (--dtype)",
    "load_format": "kvflow loads Hugging Face safetensors checkpoints only",
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
    "reasoning_parser": f"reasoning parsing is {_NOT_YET}",
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
    "max_seq_len_to_capture": "kvflow does not capture CUDA graphs yet",
    "cuda_graph_sizes": "kvflow does not capture CUDA graphs yet",
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


def refusal(option: str) -> str | None:
    """Why kvflow lacks the vLLM option (given as --flag-name, --no-flag-name or
    flag_name), or None when vLLM has no such option either."""
    name = option.lstrip("-").split("=", 1)[0].replace("-", "_")
    why = MISSING.get(name) or (MISSING.get(name[3:]) if name.startswith("no_") else None)
    if why is None:
        return None
    spelled = f"--{name.replace('_', '-')}" if option.startswith("-") else name
    return f"{spelled} is a vLLM option kvflow does not have: {why}"
