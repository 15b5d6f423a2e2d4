"""The APIs kvflow does not serve, answered with a 501 that names the API and what to use
instead: a bare 404 reads to clients as a missing model (LangChain turns it into
OpenAIModelNotFoundError), as llama.cpp's server found."""
from __future__ import annotations

from kvflow.server.errors import printable

SERVED = ("/v1/completions, /v1/chat/completions, /v1/responses, /v1/messages (Anthropic's) "
          "and /v1/models")
_POOLING = ("scoring, reranking, classification and pooling (vLLM's pooling models)",
            "kvflow serves generative models only; run the pooling model on vLLM")
_ASSISTANTS = ("the Assistants API", "use /v1/responses, with previous_response_id for a "
                                     "conversation, or /v1/chat/completions")
_FILES = ("the Files API", "send the content in the request itself")

# A path, or the start of one, and (the API, what to use instead).
UNSERVED: dict[str, tuple[str, str]] = {
    "/v1/embeddings": ("the embeddings API", "kvflow serves generative models only; serve "
                       "an embedding model with vLLM, llama.cpp's llama-server --embeddings "
                       "or text-embeddings-inference"),
    "/v1/audio": ("the audio API (speech, transcriptions, translations)",
                  "kvflow serves text models only"),
    "/v1/images": ("the images API", "kvflow serves text models only"),
    "/v1/moderations": ("the moderations API", "ask a chat model to classify the text, with a "
                        "JSON schema in response_format, at /v1/chat/completions"),
    "/v1/files": _FILES,
    "/v1/uploads": _FILES,
    "/v1/batches": ("the Batch API", "send each request to /v1/chat/completions or "
                    "/v1/responses: the server batches concurrent requests itself"),
    "/v1/fine_tuning": ("fine-tuning", "kvflow only serves models: fine-tune elsewhere and "
                        "serve the checkpoint"),
    "/v1/assistants": _ASSISTANTS,
    "/v1/threads": _ASSISTANTS,
    "/v1/vector_stores": ("vector stores", "retrieve beside the server and put what is found "
                          "in the prompt"),
    "/v1/conversations": ("the Conversations API", "use /v1/responses with "
                          "previous_response_id"),
    "/v1/realtime": ("the Realtime API", "stream /v1/chat/completions or /v1/responses"),
    "/v1/rerank": _POOLING,
    "/v1/score": _POOLING,
    "/v1/classify": _POOLING,
    "/rerank": _POOLING,
    "/v2/rerank": _POOLING,
    "/score": _POOLING,
    "/classify": _POOLING,
    "/pooling": _POOLING,
}
# The paths outside /v1 that get the 501 (everything under /v1 does).
UNSERVED_ROOTS = tuple(path for path in UNSERVED if not path.startswith("/v1/"))


def not_served_message(path: str) -> str:
    for prefix, (api, instead) in UNSERVED.items():
        if path == prefix or path.startswith(prefix + "/"):
            return f"kvflow does not serve {api}: {instead}"
    return (f"{printable(path, 100)} is not an endpoint kvflow serves; it serves {SERVED} "
            "(see the README)")
