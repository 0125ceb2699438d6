"""Output constraints more than one backend enforces: cutting text at stop strings, and a
JSON Schema (or JSON mode) as a llama.cpp grammar (GBNF).

The embedded engine uses both on its own tokens; the OpenAI-compatible backend cuts a
stream at the stop strings its upstream cannot take, and hands a grammar to an upstream
whose `/completions` takes one (llama-cpp-python's server). The grammar converter is
llama-cpp-python's own (pure Python, imported on first use: the package is the embedded
extra).
"""

from __future__ import annotations

from collections.abc import Sequence

# The schema converter lets a JSON string hold raw control characters, which JSON forbids
# (a model then writes raw newlines and never closes the string): the JSON grammar's rule.
_CONVERTER_CHAR = r'char ::= [^"\\] |'
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'


def split_on_stops(pending: str, stops: Sequence[str]) -> tuple[int, bool]:
    """How much of the unsent text may go out now, and whether a stop string was found.

    Returns (end, stopped): send `pending[:end]`. With `stopped`, `end` is where the first
    stop string begins; otherwise the text after `end` is a possible start of a stop string
    and waits for the next token.
    """
    if not stops:
        return len(pending), False
    found = [index for index in (pending.find(stop) for stop in stops) if index >= 0]
    if found:
        return min(found), True
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(pending)), hold, -1):
            if pending.endswith(stop[:size]):
                hold = size
                break
    return len(pending) - hold, False


def grammar_for_schema(schema: str) -> str:
    """GBNF for a JSON schema (llama-cpp-python's converter), strings as strict as JSON's."""
    from llama_cpp import llama_grammar

    text = llama_grammar.json_schema_to_gbnf(schema)
    return text.replace(_CONVERTER_CHAR, _JSON_CHAR)


def json_grammar() -> str:
    """GBNF for JSON mode: llama-cpp-python's JSON grammar, as the embedded engine uses it."""
    from llama_cpp import llama_grammar

    return llama_grammar.JSON_GBNF
