"""Chat messages to prompt text and token ids, through the model's chat template: the one
place that renders templates, for LLM.chat and the server alike.

A message's content is the client's text. Where it spells a special token (`<|im_start|>`,
say), that text must not become the special token, or one client message could forge a
system or assistant turn. Such content is rendered as a placeholder and tokenized on its
own with special tokens split into ordinary text; every other message is tokenized with the
rendered template, exactly as transformers' `apply_chat_template(tokenize=True)` does.
Tools, template arguments and the other fields of a message are rendered by the template
where no placeholder can stand in for them (`tojson`), so special-token text there is
refused instead.
"""
from __future__ import annotations

import inspect
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Tokenizer

from kvflow.sampling_params import ParameterError
from kvflow.tokenizer.render_process import RenderError, TemplateRenderer

logger = logging.getLogger(__name__)

Encoder = Callable[[str], list[int]]


@dataclass(frozen=True)
class ChatOptions:
    """How a conversation becomes a prompt, besides its messages: the request's fields or
    LLM.chat's keywords, with vLLM's names."""

    add_generation_prompt: bool = True
    # The prompt ends inside the final (assistant) message, which the model then continues.
    continue_final_message: bool = False
    # More variables for the template, such as {"enable_thinking": False}.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None  # OpenAI's function tools, as the template takes them
    template: str | None = None  # replaces the default template for this conversation


def load_chat_template(value: str) -> str:
    """--chat-template's value: a Jinja file's path, or the template itself (as vLLM, text
    with a brace or a newline is taken as a template). Raises ValueError for a missing file
    or a template that does not parse."""
    path = Path(value).expanduser()
    if path.is_file():
        template = path.read_text(encoding="utf-8")
    elif any(char in value for char in "{}\n"):
        template = value
    else:
        raise ValueError(f"--chat-template: no file {value!r}, and the text is no template")
    try:
        # transformers renders with the loop-controls extension; a template using it parses.
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"--chat-template does not parse: {exc}") from None
    return template


class ChatTemplate:
    def __init__(self, tokenizer: Any, default_template: str | None = None,
                 renderer: TemplateRenderer | None = None) -> None:
        """`default_template` (the server's --chat-template) replaces the tokenizer's own."""
        self.tokenizer = tokenizer
        self.default_template = default_template
        self._renderer = renderer or TemplateRenderer()
        # apply_chat_template's own arguments: a template variable of the same name would
        # set one of them (or collide with it) instead of reaching the template.
        parameters = inspect.signature(tokenizer.apply_chat_template).parameters.values()
        self.reserved_kwargs = frozenset(p.name for p in parameters
                                         if p.kind != p.VAR_KEYWORD) | {"messages"}
        self.special_texts = tuple(token.content for token in
                                   tokenizer.added_tokens_decoder.values() if token.special)
        # A copy of the backend with special-token matching off. transformers' own
        # split_special_tokens flips a flag on the shared backend, which races with the other
        # tokenizer thread.
        self._as_text: Tokenizer | None = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and self.special_texts:
            self._as_text = Tokenizer.from_str(backend.to_str())
            self._as_text.encode_special_tokens = True

    @property
    def available(self) -> bool:
        return bool(self.default_template or getattr(self.tokenizer, "chat_template", None))

    def check(self, conversation: list[dict[str, Any]], options: ChatOptions) -> None:
        """Raises ParameterError naming the field for options that contradict each other or
        the conversation."""
        if options.continue_final_message:
            if options.add_generation_prompt:
                raise ParameterError("continue_final_message", "continue_final_message and "
                                     "add_generation_prompt cannot both be true: set "
                                     "add_generation_prompt to false to continue the final "
                                     "message")
            if not conversation or conversation[-1].get("role") != "assistant":
                raise ParameterError("continue_final_message", "continue_final_message "
                                     "continues the final message, which must be the "
                                     "assistant's")
        reserved = sorted(self.reserved_kwargs & set(options.chat_template_kwargs))
        if reserved:
            raise ParameterError("chat_template_kwargs", "chat_template_kwargs may not set "
                                 f"{', '.join(reserved)}: kvflow sets these itself (use the "
                                 "request's own fields where there is one)")
        for param, value in (("tools", options.tools),
                             ("chat_template_kwargs", options.chat_template_kwargs),
                             ("messages", [{k: v for k, v in message.items() if k != "content"}
                                           for message in conversation])):
            if self._spells_special(value):
                raise ParameterError(param, f"{param} spells a special token of the "
                                            "tokenizer, which is only allowed in message "
                                            "content")

    def render(self, conversation: list[dict[str, Any]], options: ChatOptions) -> str:
        """The template's text for the conversation, as transformers' apply_chat_template
        (tokenize=False) writes it, rendered under the renderer's budget."""
        if options.template is None and not self.available:
            raise ParameterError("messages", "the model's tokenizer has no chat template")
        try:
            return self._render(conversation, options)
        except ValueError as exc:  # the template raised, or ran past its budget
            raise ParameterError("messages",
                                 f"the chat template failed on these messages: {exc}") from None

    def probe(self) -> None:
        """Renders a one-message conversation, as the server does before it reports itself
        healthy: raises RenderError for a template that runs past its budget on it. A
        template that merely raises is logged: it may refuse only this conversation."""
        try:
            self._render([{"role": "user", "content": "hello"}], ChatOptions())
        except RenderError as exc:
            if exc.over_budget:
                raise RenderError(f"the chat template failed on a one-message conversation: "
                                  f"{exc}", over_budget=True) from None
            logger.warning("the chat template failed on a one-message conversation: %s", exc)

    def close(self) -> None:
        self._renderer.close()

    def _render(self, conversation: list[dict[str, Any]], options: ChatOptions) -> str:
        # What apply_chat_template does around render_jinja_template: pick the template
        # (tools may select a named one), drop None fields (templates handle a missing
        # key, not a None one), and pass the special tokens as variables.
        template = self.tokenizer.get_chat_template(options.template or self.default_template,
                                                    options.tools)
        return self._renderer.render(
            conversation=[{k: v for k, v in m.items() if v is not None} for m in conversation],
            chat_template=template, tools=options.tools,
            add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message,
            **{**self.tokenizer.special_tokens_map, **options.chat_template_kwargs})

    def encode(self, conversation: list[dict[str, Any]], options: ChatOptions,
               encode: Encoder) -> tuple[str, list[int]]:
        """The prompt text and its token ids; `encode` tokenizes template text (special
        tokens matched, no BOS added: the template writes its own)."""
        self.check(conversation, options)
        spelled = {i for i, message in enumerate(conversation)
                   if self._spells_special(message.get("content"))}
        if not spelled or self._as_text is None:
            text = self.render(conversation, options)
            return text, encode(text)
        nonce = uuid.uuid4().hex  # unguessable, so no content can pose as a placeholder
        marked = [{**message, "content": f"<kvflow-{nonce}-{i}>"} if i in spelled else message
                  for i, message in enumerate(conversation)]
        rendered = self.render(marked, options)
        text_parts: list[str] = []
        token_ids: list[int] = []
        position = 0
        for placeholder in re.finditer(f"<kvflow-{nonce}-(\\d+)>", rendered):
            template_text = rendered[position:placeholder.start()]
            content = conversation[int(placeholder.group(1))]["content"]
            text_parts += [template_text, content]
            token_ids += encode(template_text) + self._as_text.encode(
                content, add_special_tokens=False).ids
            position = placeholder.end()
        text_parts.append(rendered[position:])
        token_ids += encode(rendered[position:])
        return "".join(text_parts), token_ids

    def _spells_special(self, value: Any) -> bool:
        """Whether a string anywhere in a JSON-like value holds a special token's text.
        Iterative: the caller's data may nest as deep as it likes."""
        pending = [value]
        while pending:
            item = pending.pop()
            if isinstance(item, str):
                if any(text in item for text in self.special_texts):
                    return True
            elif isinstance(item, dict):
                pending.extend(item)
                pending.extend(item.values())
            elif isinstance(item, (list, tuple)):
                pending.extend(item)
        return False
