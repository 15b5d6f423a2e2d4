"""How deeply JSON text nests, measured without parsing it.

Python's json module fails with a RecursionError some hundreds of levels down, and so does
every walker that recurses over what it returns (json.dumps, templates' tojson, pydantic's
serializer). JSON from a client or a model is measured here first and parsed only if its
arrays and objects nest at most MAX_JSON_DEPTH deep, which all of them handle. The scan is
linear and vectorized (a 4 MiB request body takes tens of milliseconds, most of them with
the GIL released), and a text with fewer brackets than the limit is not scanned at all.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

# Levels of arrays and objects. A request body holds a JSON schema a few levels down, and
# schemas may nest 128 levels (structured_output/limits.py); this leaves room for both.
MAX_JSON_DEPTH = 256

# bytes.translate tables: each byte's step in depth (outside strings), and quotes.
_STEPS = bytes(1 if c in b"[{" else 255 if c in b"]}" else 0 for c in range(256))
_QUOTES = bytes(1 if c == ord('"') else 0 for c in range(256))
_QUOTE, _BACKSLASH = ord('"'), ord("\\")


def _utf8(text: str | bytes) -> bytes:
    if isinstance(text, str):
        return text.encode("utf-8", "surrogatepass")
    encoding = json.detect_encoding(text)  # what json.loads reads the bytes as
    return text if encoding == "utf-8" else text.decode(encoding, "replace").encode()


def _escaped_quotes(data: bytes) -> np.ndarray:
    """Offsets of the quotes that an odd run of backslashes escapes."""
    raw = np.frombuffer(data, dtype=np.uint8)
    after_backslash = np.flatnonzero((raw[1:] == _QUOTE) & (raw[:-1] == _BACKSLASH)) + 1
    if not after_backslash.size:
        return after_backslash
    backslash = raw == _BACKSLASH
    run_starts = np.flatnonzero(backslash & ~np.concatenate(([False], backslash[:-1])))
    # The run before each such quote is the last one that starts before it.
    run = run_starts[np.searchsorted(run_starts, after_backslash, side="right") - 1]
    return after_backslash[(after_backslash - run) % 2 == 1]


def _profile(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(the depth after each byte, whether each byte is inside a string) over the JSON value
    `data` starts with, up to where it closes (a parser reads no further); empty for a
    scalar."""
    if data.lstrip()[:1] not in (b"[", b"{"):
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=bool)
    toggles = np.frombuffer(data.translate(_QUOTES), dtype=np.int8)
    if b"\\" in data:
        toggles = toggles.copy()
        toggles[_escaped_quotes(data)] = 0
    in_string = (np.cumsum(toggles, dtype=np.int32) & 1).astype(bool)
    steps = np.frombuffer(data.translate(_STEPS), dtype=np.int8)
    depth = np.cumsum(np.where(in_string, 0, steps), dtype=np.int32)
    first_open = int(np.argmax(depth > 0))
    closed = depth[first_open:] <= 0
    if closed.any():
        end = first_open + int(np.argmax(closed)) + 1
        depth, in_string = depth[:end], in_string[:end]
    return depth, in_string


def _deepest(data: bytes) -> int:
    return int(_profile(data)[0].max(initial=0))


def _may_pass(data: bytes) -> bool:
    """Fewer brackets than the limit cannot nest past it: most texts are not scanned."""
    return data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH


def json_depth(text: str | bytes) -> int:
    """The most arrays and objects open at once in the JSON value `text` starts with (after
    whitespace): 0 for a scalar; a value cut short counts as far as it goes. Bytes are read
    in the encoding json.loads would detect."""
    return _deepest(_utf8(text))


def within_json_depth(text: str | bytes) -> bool:
    data = _utf8(text)
    return not _may_pass(data) or _deepest(data) <= MAX_JSON_DEPTH


class TooDeepError(ValueError):
    """JSON that nests past MAX_JSON_DEPTH; the message reads after the field's name."""

    def __init__(self, depth: int) -> None:
        super().__init__(f"nests {depth:,} levels of arrays and objects; the limit is "
                         f"{MAX_JSON_DEPTH}")


def loads(text: str) -> Any:
    """json.loads of JSON that nests at most MAX_JSON_DEPTH deep; past it, TooDeepError (a
    ValueError, as json's own errors are) before anything is parsed."""
    if not within_json_depth(text):
        raise TooDeepError(json_depth(text))
    return json.loads(text)


def too_deep(body: bytes) -> tuple[int, str | None] | None:
    """None if a request body nests within the limit; else its depth and the top-level key
    whose value nests too deep (None if the body is no object or the key cannot be read)."""
    data = _utf8(body)
    if not _may_pass(data):
        return None
    depth, in_string = _profile(data)
    deepest = int(depth.max(initial=0))
    if deepest <= MAX_JSON_DEPTH:
        return None
    excess = int(np.argmax(depth > MAX_JSON_DEPTH))
    # The member that holds it starts after the last comma or brace at the top level.
    raw = np.frombuffer(data, dtype=np.uint8)[:excess]
    top = (depth[:excess] == 1) & ~in_string[:excess] & (
        (raw == ord(",")) | (raw == ord("{")))
    starts = np.flatnonzero(top)
    if data.lstrip()[:1] != b"{" or not starts.size:
        return deepest, None
    member = data[starts[-1] + 1:excess].decode("utf-8", "replace").lstrip()
    try:
        key, _ = json.JSONDecoder().raw_decode(member)
    except ValueError:
        return deepest, None
    return deepest, key if isinstance(key, str) else None
