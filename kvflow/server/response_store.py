"""Responses kept in memory for `previous_response_id` and `GET /v1/responses/{id}`: at
most `max_size` of them (--max-stored-responses), the oldest evicted first."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from kvflow.server.responses_protocol import InputItem

DEFAULT_MAX_STORED_RESPONSES = 1000


@dataclass(frozen=True)
class StoredResponse:
    body: dict[str, Any]  # as it was answered
    # Every item of its conversation, its own output last (instructions are not carried
    # over, as in OpenAI's API). A continuation shares the items of the response it
    # continues: each response costs a list of references, not a copy of the text.
    conversation: list[InputItem]


class ResponseStore:
    def __init__(self, max_size: int = DEFAULT_MAX_STORED_RESPONSES) -> None:
        self.max_size = max_size
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()  # requests are prepared on worker threads

    def put(self, response_id: str, response: StoredResponse) -> None:
        with self._lock:
            self._responses[response_id] = response
            while len(self._responses) > self.max_size:
                self._responses.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            return self._responses.get(response_id)

    def missing(self, response_id: str) -> str:
        """Why a response is not found, for the error."""
        return (f"no stored response has the id {response_id!r}: it was made with store "
                f"false, or evicted (the server keeps the last {self.max_size}; "
                "--max-stored-responses), or made before the server restarted")
