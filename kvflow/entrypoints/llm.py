"""The offline API, with vLLM's names so that users' code carries over."""
from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from kvflow.engine.args import EngineArgs
from kvflow.engine.generation_config import load_generation_defaults
from kvflow.engine.input_preparer import PromptType
from kvflow.engine.llm_engine import LLMEngine
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams
from kvflow.tokenizer.chat import ChatOptions, ChatTemplate
from kvflow.vllm_compat import refusal

Message = dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        """`model`: a checkpoint directory or hub id; None for the shipped demo model.
        Options are EngineArgs' fields, with vLLM's names. A vLLM option kvflow lacks is
        refused with the reason, unless its value leaves the feature off (None or False)."""
        known = {f.name for f in dataclasses.fields(EngineArgs)}
        for name, value in list(engine_options.items()):
            why = refusal(name) if name not in known else None
            if why is not None and value not in (None, False):
                raise ValueError(why)
            if why is not None:
                del engine_options[name]
        try:
            args = EngineArgs(model=model, **engine_options)
        except TypeError as exc:
            raise TypeError(f"unknown LLM option: {exc}") from exc
        self.llm_engine = LLMEngine(args)
        self._generation_defaults = load_generation_defaults(
            args.generation_config, self.llm_engine.model_config.path,
            args.override_generation_config)
        self._chat_template = ChatTemplate(self.llm_engine.tokenizer)
        self._ids = itertools.count()

    @property
    def engine(self) -> LLMEngine:
        """kvflow's name for llm_engine (vLLM's)."""
        return self.llm_engine

    def get_tokenizer(self):  # noqa: ANN201
        return self.engine.tokenizer

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """The SamplingParams fields the model's generation config sets (generation_config,
        override_generation_config), by field name."""
        return dict(self._generation_defaults)

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate() and chat() use without sampling_params: SamplingParams() with the
        model's generation defaults applied."""
        return SamplingParams(**self._generation_defaults)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request: None = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Outputs in prompt order. One SamplingParams for all prompts, or one per prompt.
        lora_request is vLLM's; kvflow has no adapters, so only None is accepted."""
        if lora_request is not None:
            raise ValueError("lora_request: LoRA adapters are not supported; merge the adapter "
                             "into the weights")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        request_ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, p,
                                        priority=priority[i] if priority is not None else 0)
                request_ids.append(request_id)
            return self._run(request_ids, use_tqdm)
        finally:
            # On a bad prompt or an interrupt, leave no request behind in the engine.
            self.engine.abort_request(request_ids)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Each conversation rendered by the chat template (`chat_template` replaces the
        tokenizer's), then generated as generate() does. Raises ParameterError (a
        ValueError) naming the keyword for options that contradict each other."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        options = ChatOptions(add_generation_prompt=add_generation_prompt,
                              continue_final_message=continue_final_message,
                              chat_template_kwargs=chat_template_kwargs or {}, tools=tools,
                              template=chat_template)
        tokenizer = self.engine.tokenizer
        prompts = []
        for conversation in conversations:
            text, token_ids = self._chat_template.encode(
                conversation, options,
                lambda text: tokenizer.encode(text, add_special_tokens=False))
            prompts.append({"prompt": text, "prompt_token_ids": token_ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        start = time.perf_counter()
        prompt_tokens = output_tokens = 0
        kv = self.engine.kv_manager
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if not output.finished:
                    continue
                finished[output.request_id] = output
                prompt_tokens += len(output.prompt_token_ids)
                output_tokens += sum(len(o.token_ids) for o in output.outputs)
                elapsed = time.perf_counter() - start
                postfix = (f"input: {prompt_tokens / elapsed:.1f} tok/s, "
                           f"output: {output_tokens / elapsed:.1f} tok/s")
                if kv.enable_caching:
                    postfix += f", prefix cache hit rate: {kv.stats.hit_rate:.1%}"
                bar.set_postfix_str(postfix, refresh=False)
                bar.update(1)
        bar.close()
        return [finished[request_id] for request_id in request_ids]
