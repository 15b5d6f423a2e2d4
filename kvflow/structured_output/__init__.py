"""Structured output: grammars compiled once per distinct constraint (compiler.py), a
matcher per sequence advanced by every token it accepts (matcher.py), and next-token
bitmasks applied to the logits of constrained rows only (bitmask.py). The constraint
itself, StructuredOutputsParams, lives beside SamplingParams, as in vLLM."""
