"""Output constraints more than one backend enforces: cutting text at stop strings, and a
JSON Schema (or JSON mode) as a llama.cpp grammar (GBNF).

The embedded engine uses both on its own tokens; the OpenAI-compatible backend cuts a
stream at the stop strings its upstream cannot take, and hands a grammar to an upstream
whose `/completions` takes one (llama-cpp-python's server). The grammar converter is
llama-cpp-python's own (pure Python, imported on first use: the package is the embedded
extra).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agentloop.schema_limits import keywords

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


#: The keywords llama-cpp-python's converter holds the output to, and those that only annotate.
#: Any other (minimum, multipleOf, uniqueItems, oneOf's "exactly one", ...) would leave the
#: grammar looser than the schema.
GRAMMAR_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "enum", "const", "anyOf", "allOf", "$ref", "pattern", "minLength",
    "maxLength", "format",
    "title", "description", "default", "examples", "$schema", "$id", "$defs", "definitions",
    "$comment", "deprecated", "readOnly", "writeOnly",
})


def unenforced_keyword(schema: Mapping[str, Any]) -> str | None:
    """The first keyword (as `path/keyword`) of a schema that the grammar would not hold the
    output to, or None when the grammar holds all of it."""
    for path, key, _ in keywords(schema):
        if key not in GRAMMAR_KEYWORDS:
            return f"{path}/{key}" if path else key
    return None


def grammar_for_schema(schema: str) -> str:
    """GBNF for a JSON schema (llama-cpp-python's converter), strings as strict as JSON's."""
    from llama_cpp import llama_grammar

    text = llama_grammar.json_schema_to_gbnf(schema)
    return text.replace(_CONVERTER_CHAR, _JSON_CHAR)


def json_grammar() -> str:
    """GBNF for JSON mode: llama-cpp-python's JSON grammar, as the embedded engine uses it."""
    from llama_cpp import llama_grammar

    return llama_grammar.JSON_GBNF


#: Text the model may write instead of a call (tool choice auto): anything that does not
#: open like a call (`{`) or with blank space, so the first character tells them apart.
_FREE_TEXT_RULES = 'root ::= tool-call | free-text\nfree-text ::= [^{ \\t\\r\\n] [^\\x00]*\n'


def grammar_for_tool_calls(schema: str, forced: bool) -> str:
    """GBNF for an answer under tools: one call per `schema` (tool_calls.calls_schema, as
    JSON text), or, unless a call is `forced`, plain text instead."""
    text = grammar_for_schema(schema)
    if forced:
        return text
    lines = text.splitlines()
    renamed = ["tool-call ::=" + line[len("root ::="):] if line.startswith("root ::=") else line
               for line in lines]
    return _FREE_TEXT_RULES + "\n".join(renamed) + "\n"
