"""Bounds on what a request may ask llguidance to compile, checked before it sees it.

llguidance builds grammars recursively on the calling thread's native stack: a JSON schema
that chains a few thousand `$ref`s, or a grammar whose rules chain a few thousand deep,
overflows an 8 MiB stack and takes the process down with SIGSEGV. Each constraint is
therefore bounded in size (which also bounds compile time) and in depth (so that the
client hears which limit it passed), and compiled on a thread whose stack holds far more
than any constraint within the size bounds can use: a chain costs llguidance 2.4-3.4 KiB
of stack per level and at least 7 bytes of text per level (measured with llguidance 1.9),
so MAX_GRAMMAR_BYTES of Lark needs at most about 32 MiB.
"""
from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from kvflow.sampling_params import ParameterError, StructuredOutputsParams

T = TypeVar("T")

MAX_SCHEMA_BYTES = 256 * 1024  # a JSON schema, as compact JSON
MAX_GRAMMAR_BYTES = 64 * 1024  # a Lark or GBNF grammar
MAX_REGEX_BYTES = 16 * 1024
MAX_CHOICE_BYTES = 64 * 1024  # all of a choice list's strings together
# Levels of nesting: JSON containers in a schema (following its local $refs), or rules
# that each refer to the next in a grammar. OpenAI allows 10 levels of schema nesting.
MAX_CONSTRAINT_DEPTH = 128
COMPILE_STACK_BYTES = 256 * 2**20  # address space; only the pages a compile touches are used

_compile_stack_lock = threading.Lock()


def check_constraint(params: StructuredOutputsParams) -> None:
    """Raises ParameterError("structured_outputs", ...) naming the limit a constraint
    passes."""
    kind = params.kind
    if kind == "json":
        _check_depth("JSON schema", schema_depth(params.json))  # first: dumps recurses
        size = len(json.dumps(params.json, separators=(",", ":")))
        _check_size("JSON schema", size, MAX_SCHEMA_BYTES)
    elif kind == "regex":
        _check_size("regular expression", len(params.regex.encode()), MAX_REGEX_BYTES)
    elif kind == "choice":
        _check_size("choice list", sum(len(c.encode()) for c in params.choice),
                    MAX_CHOICE_BYTES)
    elif kind == "grammar":
        _check_size("grammar", len(params.grammar.encode()), MAX_GRAMMAR_BYTES)
        _check_depth("grammar", grammar_depth(params.grammar))


def _check_size(what: str, size: int, limit: int) -> None:
    if size > limit:
        raise ParameterError("structured_outputs", f"the {what} is {size:,} bytes; the limit "
                                                   f"is {limit:,}")


def _check_depth(what: str, depth: int) -> None:
    if depth > MAX_CONSTRAINT_DEPTH:
        raise ParameterError("structured_outputs", f"the {what} nests {depth:,} levels deep; "
                                                   f"the limit is {MAX_CONSTRAINT_DEPTH}")


def on_compile_stack(fn: Callable[[], T]) -> T:
    """fn() on a fresh thread with a COMPILE_STACK_BYTES stack; its exception is raised."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            result.append((False, exc))

    with _compile_stack_lock:  # the stack size is process-wide while a thread is made
        previous = threading.stack_size(COMPILE_STACK_BYTES)
        try:
            thread = threading.Thread(target=run, name="kvflow-grammar-compile", daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous)
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def longest_path(roots: list[Any], children: Callable[[Any], Iterator[Any]],
                 key: Callable[[Any], Any] = id) -> int:
    """Nodes on the longest chain from any root, counting each node once per chain: an edge
    back to a node on the chain (recursion) ends it. Iterative, so any depth is safe."""
    height: dict[Any, int] = {}
    on_path: set[Any] = set()
    best = 0
    for root in roots:
        if key(root) in height:
            best = max(best, height[key(root)])
            continue
        stack = [(root, children(root), 1)]
        on_path.add(key(root))
        while stack:
            node, pending, tallest = stack[-1]
            child = next(pending, None)
            if child is not None:
                k = key(child)
                if k in height:
                    stack[-1] = (node, pending, max(tallest, 1 + height[k]))
                elif k not in on_path:
                    on_path.add(k)
                    stack.append((child, children(child), 1))
                continue
            stack.pop()
            on_path.discard(key(node))
            height[key(node)] = tallest
            if stack:
                parent, parent_pending, parent_tallest = stack[-1]
                stack[-1] = (parent, parent_pending, max(parent_tallest, 1 + tallest))
        best = max(best, height[key(root)])
    return best


def schema_depth(schema: Any) -> int:
    """JSON containers nested in a schema, a local $ref counting as the schema it names."""

    def children(node: Any) -> Iterator[Any]:
        values = node.values() if isinstance(node, dict) else node
        for value in values:
            if isinstance(value, (dict, list)):
                yield value
        if isinstance(node, dict) and isinstance(node.get("$ref"), str):
            target = _resolve(schema, node["$ref"])
            if isinstance(target, (dict, list)):
                yield target

    return longest_path([schema], children) if isinstance(schema, (dict, list)) else 0


def _resolve(root: Any, ref: str) -> Any:
    """The value a local JSON pointer ("#/$defs/a") names, or None."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


# A rule's definition at the start of a line: Lark's `name:` (`?name:`, `!name:`,
# `name.2:`) or GBNF's `name ::=`.
_DEFINITION = re.compile(r"^[ \t]*[?!]?([A-Za-z_][\w-]*)(?:\.-?\d+)?[ \t]*(?:::=|:)", re.M)
# Literals, regular expressions, character classes and comments name no rule.
_NOT_NAMES = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|/(?:\\.|[^/\\\n])+/[a-z]*'
                        r'|\[(?:\\.|[^\]\\])*\]|(?://|#)[^\n]*')
_NAME = re.compile(r"[A-Za-z_][\w-]*")


def grammar_depth(grammar: str) -> int:
    """The longest chain of rules in a Lark or GBNF grammar that each refer to the next."""
    definitions = list(_DEFINITION.finditer(grammar))
    rules: dict[str, set[str]] = {}
    for definition, following in zip(definitions, definitions[1:] + [None]):
        body = grammar[definition.end():following.start() if following else len(grammar)]
        rules.setdefault(definition.group(1), set()).update(
            _NAME.findall(_NOT_NAMES.sub(" ", body)))
    return longest_path(list(rules), lambda name: iter(sorted(rules[name] & rules.keys())),
                        key=lambda name: name)
