"""Chat messages to prompt text and token ids, through the model's chat template: the one
place that renders templates, for LLM.chat and the server alike.

A message's content is the client's text. Where it spells a special token (`<|im_start|>`,
say), that text must not become the special token, or one client message could forge a
system or assistant turn. Such content is rendered as a placeholder and tokenized on its
own with special tokens split into ordinary text; every other message is tokenized with the
rendered template, exactly as transformers' `apply_chat_template(tokenize=True)` does.
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

from tokenizers import Tokenizer

from kvflow.sampling_params import ParameterError

Encoder = Callable[[str], list[int]]


class ChatTemplate:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
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
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, conversation: list[dict[str, Any]], add_generation_prompt: bool,
               template: str | None = None) -> str:
        """`template` replaces the tokenizer's own, as in transformers."""
        if template is None and not self.available:
            raise ParameterError("messages", "the model's tokenizer has no chat template")
        try:
            return self.tokenizer.apply_chat_template(
                conversation, chat_template=template, tokenize=False,
                add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # noqa: BLE001 - jinja errors: the template refused these
            raise ParameterError("messages",
                                 f"the chat template failed on these messages: {exc}") from None

    def encode(self, conversation: list[dict[str, Any]], add_generation_prompt: bool,
               encode: Encoder, template: str | None = None) -> tuple[str, list[int]]:
        """The prompt text and its token ids; `encode` tokenizes template text (special
        tokens matched, no BOS added: the template writes its own)."""
        spelled = {i for i, message in enumerate(conversation)
                   if self._spells_special(message.get("content"))}
        if not spelled or self._as_text is None:
            text = self.render(conversation, add_generation_prompt, template)
            return text, encode(text)
        nonce = uuid.uuid4().hex  # unguessable, so no content can pose as a placeholder
        marked = [{**message, "content": f"<kvflow-{nonce}-{i}>"} if i in spelled else message
                  for i, message in enumerate(conversation)]
        rendered = self.render(marked, add_generation_prompt, template)
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

    def _spells_special(self, content: Any) -> bool:
        return isinstance(content, str) and any(text in content for text in self.special_texts)
