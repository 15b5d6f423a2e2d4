"""Single-file GGUF models (llama.cpp's format): config, weights and tokenizer."""
from kvflow.models.gguf.file import GgufFile, is_gguf

__all__ = ["GgufFile", "is_gguf"]
