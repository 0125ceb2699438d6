"""JSON Schemas from callers: bounded before anything compiles or runs them.

A caller's schema reaches an engine's grammar compiler (`format` TYPE_JSON_SCHEMA), the
agent's validation of client tool arguments and jsonschema's own schema check, and each can
be taken down by a small document. So every schema from a caller goes through
`parse_schema` first, which refuses (`SchemaRefused`, naming the rule) anything beyond the
limits below, and is validated only with `validator_for_schema` (RE2 for patterns,
references only inside the document). `load_json` is the depth-bounded JSON reader for the
model's own replies. Each limit and why: docs/security.md ("Threat model").
"""

from __future__ import annotations

import functools
import json
import math
import re
import re._constants as sre_constants
import re._parser as sre_parse
from collections.abc import Iterator, Mapping
from typing import Any

import re2
import referencing
import referencing.exceptions
from jsonschema import Draft202012Validator, ValidationError
from jsonschema.exceptions import SchemaError, best_match
from jsonschema.protocols import Validator
from jsonschema.validators import extend, validator_for

#: Largest schema document, in UTF-8 bytes.
MAX_SCHEMA_BYTES = 32 * 1024
#: Deepest nesting of JSON arrays and objects in a schema (and in a model's reply).
MAX_DEPTH = 32
#: Most values in one `enum`, and `enum` values plus `const`s in one document.
MAX_ENUM_VALUES = 256
MAX_LITERALS = 1024
#: Longest string in an `enum` or a `const`, in characters.
MAX_LITERAL_CHARS = 1024
#: Largest repetition bound (maxLength, maxItems, ...): RE2's own limit for `{n,m}`.
MAX_REPETITION = 1000
#: Most repetitions in one document, bounds and `pattern` counts summed: a grammar grows
#: with their sum (600 strings of maxLength 1000 make 3.4 MB of GBNF from 32 KiB).
MAX_TOTAL_REPETITION = 4096
#: Largest magnitude of a numeric bound (minimum, maximum, ...): engines that turn
#: integer ranges into digit rules grow with the digits.
MAX_NUMBER = 2**63
#: Most subschemas once every reference is followed: validation walks them all, and
#: references that fan out (anyOf of two refs to anyOf of two refs ...) grow exponentially.
MAX_EXPANDED_SUBSCHEMAS = 10_000
#: Longest `pattern` (or `patternProperties` key), in characters.
MAX_PATTERN_CHARS = 1024
#: Optional parts (`a?`, `b*`) one after another in a pattern: grammar engines keep a stack
#: per way the text so far can match, so a run of them multiplies the work of every token.
MAX_ADJACENT_OPTIONAL = 16

#: Keywords whose value is a count an engine expands into that many grammar repetitions.
REPETITION_KEYWORDS = frozenset({
    "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
    "minContains", "maxContains",
})
_NUMBER_KEYWORDS = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
})
# Keywords holding data, not subschemas: their insides are not keywords.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
_REFERENCE_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")
# `{n}`, `{n,}` and `{n,m}` in a regex (counted roughly: escaped braces count too).
_QUANTIFIER = re.compile(r"\{(\d+)(?:,(\d*))?\}")
# C0 controls and DEL: a NUL in a grammar literal aborts llama.cpp.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SchemaRefused(ValueError):
    """The schema breaks a limit or a rule; the message says which, for the caller."""


def load_json(text: str | bytes, max_depth: int = MAX_DEPTH, strict: bool = True) -> Any:
    """json.loads with a depth limit and without NaN or Infinity: ValueError for all three.
    `strict=False` lets control characters (a raw newline) stand inside strings.

    The C decoder stops itself at the interpreter's recursion limit (RecursionError, which
    becomes ValueError here); the depth limit is then checked on the result, iteratively."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                           strict=strict)
    except RecursionError:
        raise ValueError(f"nested too deep; the limit is {max_depth} levels") from None
    depth = nesting_depth(value)
    if depth > max_depth:
        raise ValueError(f"nested {depth} levels deep; the limit is {max_depth}")
    return value


def nesting_depth(value: Any) -> int:
    """How deep lists and dicts nest in a JSON value (without recursion)."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            pending.extend((child, level + 1) for child in item)
    return deepest


def parse_schema(text: str) -> dict[str, Any]:
    """A caller's JSON Schema text -> the schema object, or SchemaRefused saying why."""
    size = len(text.encode())
    if size > MAX_SCHEMA_BYTES:
        raise SchemaRefused(f"the schema is {size} bytes; the limit is {MAX_SCHEMA_BYTES}")
    try:
        schema = load_json(text)
    except ValueError as exc:
        raise SchemaRefused(f"not valid JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise SchemaRefused("must be a JSON object (a JSON Schema)")
    check_schema(schema)
    return schema


def check_schema(schema: Mapping[str, Any]) -> None:
    """Limits and rules first (cheap, bounded), then the dialect's own meta-schema."""
    _check_limits(schema)
    _ExpandedSize(schema).check()  # before the meta-schema, whose cost grows with the size
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        raise SchemaRefused(f"not a valid JSON Schema: {exc.message}") from None


def validator_for_schema(schema: Mapping[str, Any]) -> Validator:
    """A validator for a schema that passed `check_schema`: RE2 regexes, local refs only."""
    return _safe_class(validator_for(schema, default=Draft202012Validator))(
        schema, registry=_registry())


def first_error(schema: Mapping[str, Any], instance: Any) -> str | None:
    """The most relevant validation error's message, or None when `instance` is valid."""
    try:
        error = best_match(validator_for_schema(schema).iter_errors(instance))
    except referencing.exceptions.Unresolvable as exc:  # checked at request time; defensive
        return f"the schema has a reference that does not resolve ({exc})"
    except OverflowError:  # multipleOf with a huge integer, say
        return "a number is too large to check against the schema"
    return None if error is None else error.message


# --- limits -------------------------------------------------------------------------------

def _check_limits(schema: Mapping[str, Any]) -> None:
    literals = repetitions = 0
    uses_pattern_properties = any(key == "patternProperties" for _, key, _ in _keywords(schema))
    for path, key, value in _keywords(schema):
        where = f"{path}/{key}" if path else key
        if key in REPETITION_KEYWORDS and isinstance(value, int | float):
            if value > MAX_REPETITION:
                raise SchemaRefused(f"{where} is {value}; the limit is {MAX_REPETITION}")
            repetitions += max(0, int(value))
        elif key in _NUMBER_KEYWORDS and isinstance(value, int | float) and \
                abs(value) > MAX_NUMBER:
            raise SchemaRefused(f"{where} is out of range (at most 2**63 in magnitude)")
        elif key == "pattern" and isinstance(value, str):
            repetitions += _pattern_repetitions(value)
        elif key == "patternProperties" and isinstance(value, Mapping):
            repetitions += sum(_pattern_repetitions(pattern) for pattern in value
                               if isinstance(pattern, str))
        if repetitions > MAX_TOTAL_REPETITION:
            raise SchemaRefused(f"the schema's repetition bounds add up to more than "
                                f"{MAX_TOTAL_REPETITION}")
        if key == "enum" and isinstance(value, list):
            if len(value) > MAX_ENUM_VALUES:
                raise SchemaRefused(
                    f"{where} has {len(value)} values; the limit is {MAX_ENUM_VALUES}")
            literals += len(value)
            for item in value:
                _check_literal(item, where)
        elif key == "const":
            literals += 1
            _check_literal(value, where)
        elif key == "pattern" and isinstance(value, str):
            _check_pattern(value, where)
        elif key == "patternProperties" and isinstance(value, Mapping):
            for pattern in value:
                _check_pattern(pattern, where)
        elif key in ("properties", "required", "dependentRequired") and _has_control(value):
            raise SchemaRefused(f"{where}: property names must not contain control characters")
        elif key in _REFERENCE_KEYWORDS and not (isinstance(value, str) and
                                                  value.startswith("#")):
            raise SchemaRefused(f"{where} must point inside the schema (start with '#'); "
                                "nothing outside it is fetched")
        elif key == "$id" and path:
            raise SchemaRefused(f"{where}: only the root may set a base URI")
        elif key == "unevaluatedProperties" and uses_pattern_properties:
            raise SchemaRefused(
                f"{where} cannot be combined with patternProperties in one schema here")
        if literals > MAX_LITERALS:
            raise SchemaRefused(
                f"the schema has more than {MAX_LITERALS} enum and const values")


_SCHEMA_MAPS = frozenset({
    "properties", "patternProperties", "$defs", "definitions", "dependentSchemas",
})


def keywords(schema: Mapping[str, Any]) -> Iterator[tuple[str, str, Any]]:
    """(path, keyword, value) for every keyword of every subschema of a checked schema."""
    return _keywords(schema)


def _keywords(schema: Any, path: str = "",
              shallow: bool = False) -> Iterator[tuple[str, str, Any]]:
    """(path, keyword, value) for every keyword of every subschema (of this one only when
    `shallow`); data is not entered."""
    if not isinstance(schema, Mapping):
        return
    for key, value in schema.items():
        yield path, key, value
        if shallow or key in _DATA_KEYWORDS:
            continue
        child = f"{path}/{key}" if path else key
        if key in _SCHEMA_MAPS and isinstance(value, Mapping):
            for name, subschema in value.items():
                yield from _keywords(subschema, f"{child}/{name}")
        elif isinstance(value, Mapping):
            yield from _keywords(value, child)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                yield from _keywords(item, f"{child}/{index}")


def _subschemas(key: str, value: Any) -> list[Any]:
    """The subschemas a keyword's value holds (its data is not a schema)."""
    if key in _SCHEMA_MAPS and isinstance(value, Mapping):
        return list(value.values())
    if isinstance(value, Mapping):
        return [value]
    if isinstance(value, list):
        return value
    return []


def _check_literal(value: Any, where: str) -> None:
    if isinstance(value, str):
        if len(value) > MAX_LITERAL_CHARS:
            raise SchemaRefused(
                f"{where} has a string of {len(value)} characters; the limit is "
                f"{MAX_LITERAL_CHARS}")
        if _CONTROL.search(value):
            raise SchemaRefused(f"{where} must not contain control characters (such as NUL)")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_literal(key, where)
            _check_literal(item, where)
    elif isinstance(value, list):
        for item in value:
            _check_literal(item, where)


def _has_control(value: Any) -> bool:
    names = value.keys() if isinstance(value, Mapping) else value if isinstance(value, list) \
        else ()
    return any(isinstance(name, str) and _CONTROL.search(name) for name in names)


def _check_pattern(pattern: str, where: str) -> None:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise SchemaRefused(f"{where} is {len(pattern)} characters; the limit is "
                            f"{MAX_PATTERN_CHARS}")
    if _CONTROL.search(pattern):
        raise SchemaRefused(f"{where} must not contain control characters")
    try:
        _compiled(pattern)
        parsed = sre_parse.parse(pattern)
    except UnicodeError:  # a lone surrogate ("\ud800"): not text RE2 can read
        raise SchemaRefused(f"{where} must be valid Unicode (no lone surrogates)") from None
    except (re2.error, re.error, RecursionError, OverflowError):
        raise SchemaRefused(
            f"{where} {pattern!r} is not a regular expression RE2 runs in linear time "
            "(no lookaround, no backreferences, repetitions up to {1000})") from None
    problem = _grammar_problem(parsed) or _unescaped_closer(pattern)
    if problem:
        raise SchemaRefused(f"{where} {pattern!r}: {problem}")


def _unescaped_closer(pattern: str) -> str | None:
    """A `]` or `}` that opens nothing, read as llama.cpp's pattern converter reads it.

    Regular expressions take a stray `]` or `}` (and a `]` first in a set, `[]a]`) as a
    literal; llama-cpp-python's converter loops forever on one, holding a grammar builder
    of the engine for good. Its reading: an escape is two characters, a set ends at the
    first unescaped `]`, a repetition at the first `}`."""
    body = pattern.removeprefix("^").removesuffix("$")
    index = 0
    while index < len(body):
        char = body[index]
        if char == "\\":
            index += 2
        elif char == "[":
            index += 1
            while index < len(body) and body[index] != "]":
                index += 2 if body[index] == "\\" else 1
            index += 1
        elif char == "{":
            index = body.find("}", index)
            if index < 0:
                return None  # the converter refuses an unclosed repetition itself
            index += 1
        elif char in "]}":
            return f"a {char!r} that opens nothing must be escaped (\\{char})"
        else:
            index += 1
    return None


# What a pattern may not ask of a grammar engine (llama.cpp's, Ollama's): a control
# character (JSON strings cannot hold one raw, and a NUL aborts llama.cpp), a repeated part
# that can match nothing (`(a?){300}`: the grammar's ways to match explode), or a long run
# of optional parts. Read from Python's own parse of the pattern: parsing is linear.
_REPEATS = (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT)


def _grammar_problem(items: Any) -> str | None:
    adjacent = 0
    for op, argument in items:
        if op is sre_constants.LITERAL and _is_control(argument):
            return "must not match a control character"
        if op is sre_constants.IN and argument[:1] != [(sre_constants.NEGATE, None)]:
            # (a negated set such as [^\x00-\x1f] excludes what it names: nothing to refuse)
            for inner, value in argument:
                low, high = value if inner is sre_constants.RANGE else (value, value) \
                    if inner is sre_constants.LITERAL else (1, 0)
                if low <= high and (low < 32 or low <= 127 <= high):
                    return "must not match a control character"
        children: list[Any] = []
        if op in _REPEATS:
            low, high, body = argument
            if high > 1 and _nullable(body):
                return "a repeated part must not match the empty string"
            children = [body]
        elif op is sre_constants.SUBPATTERN:
            children = [argument[-1]]
        elif op is sre_constants.BRANCH:
            children = list(argument[1])
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            children = [argument[1]]
        for child in children:
            problem = _grammar_problem(child)
            if problem:
                return problem
        adjacent = adjacent + 1 if _nullable([(op, argument)]) else 0
        if adjacent > MAX_ADJACENT_OPTIONAL:
            return f"more than {MAX_ADJACENT_OPTIONAL} optional parts in a row"
    return None


def _is_control(code: int) -> bool:
    return code < 32 or code == 127


def _nullable(items: Any) -> bool:
    """Can this part of a parsed pattern match the empty string?"""
    for op, argument in items:
        if op in _REPEATS:
            low, _, body = argument
            if low > 0 and not _nullable(body):
                return False
        elif op is sre_constants.SUBPATTERN:
            if not _nullable(argument[-1]):
                return False
        elif op is sre_constants.BRANCH:
            if not any(_nullable(branch) for branch in argument[1]):
                return False
        elif op not in (sre_constants.AT, sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            return False
    return True


class _ExpandedSize:
    """Measures the subschemas validation may visit, following references: every
    reference must resolve inside the document, none may lead back to itself (a cycle
    that consumes nothing of the instance never ends), and the total and the nesting stay
    within MAX_EXPANDED_SUBSCHEMAS and MAX_DEPTH (validators recurse per level)."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self._schema = schema
        self._resolver = _registry().resolver_with_root(_resource(schema))
        self._measured: dict[int, tuple[int, int]] = {}  # id(subschema) -> (size, depth)
        self._following: list[str] = []

    def check(self) -> None:
        _, depth = self._measure(self._schema, 1)
        if depth > MAX_DEPTH:
            raise self._too_deep()

    @staticmethod
    def _too_deep() -> SchemaRefused:
        return SchemaRefused(f"the schema nests more than {MAX_DEPTH} levels deep once its "
                             "references are followed")

    def _measure(self, node: Any, level: int) -> tuple[int, int]:
        """(subschemas, nesting) of `node` with its references followed."""
        known = self._measured.get(id(node))
        if known is not None:
            return known
        if level > MAX_DEPTH:
            raise self._too_deep()
        size, depth = 1, 0
        for _, key, value in _keywords(node, shallow=True):
            if key in _DATA_KEYWORDS:
                continue
            if key in _REFERENCE_KEYWORDS and isinstance(value, str):
                measures = [self._follow(value, level)]
            else:
                measures = [self._measure(child, level + 1) for child in _subschemas(key, value)]
            for child_size, child_depth in measures:
                size += child_size
                depth = max(depth, child_depth)
            if size > MAX_EXPANDED_SUBSCHEMAS:
                raise SchemaRefused(
                    f"the schema expands to more than {MAX_EXPANDED_SUBSCHEMAS} subschemas "
                    "once its references are followed")
        result = (size, depth + 1)
        if isinstance(node, Mapping):
            self._measured[id(node)] = result
        return result

    def _follow(self, ref: str, level: int) -> tuple[int, int]:
        if ref in self._following:
            raise SchemaRefused(f"$ref {ref!r} refers back to itself (recursive schemas are "
                                "not accepted)")
        try:
            target = self._resolver.lookup(ref).contents
        except referencing.exceptions.Unresolvable:
            raise SchemaRefused(f"$ref {ref!r} does not resolve inside the schema") from None
        self._following.append(ref)
        try:
            return self._measure(target, level + 1)
        finally:
            self._following.pop()


def _pattern_repetitions(pattern: str) -> int:
    return sum(int(high or low) for low, high in _QUANTIFIER.findall(pattern[:MAX_PATTERN_CHARS]))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


# --- validation: RE2 and local references -------------------------------------------------

@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> Any:
    options = re2.Options()
    options.log_errors = False
    return re2.compile(pattern, options)


def _search(pattern: str, text: str) -> bool:
    try:
        return _compiled(pattern).search(text) is not None
    except UnicodeError:  # text with a lone surrogate (a JSON "\ud800") matches nothing
        return False


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: Mapping[str, Any], instance: Any,
                        schema: Any) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, additional: Any, instance: Any,
                           schema: Mapping[str, Any]) -> Iterator[Any]:
    """jsonschema's additionalProperties with RE2 for the patternProperties it consults."""
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [key for key in instance if key not in properties
              and not any(_search(pattern, key) for pattern in patterns)]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        listed = ", ".join(repr(extra) for extra in sorted(extras))
        yield ValidationError(f"Additional properties are not allowed ({listed} unexpected)")


@functools.cache
def _safe_class(cls: type[Validator]) -> type[Validator]:
    return extend(cls, {  # type: ignore[no-any-return]
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
    })


def _refuse_retrieval(uri: str) -> referencing.Resource[Any]:
    raise referencing.exceptions.NoSuchResource(ref=uri)


@functools.cache
def _registry() -> referencing.Registry[Any]:
    """Resolves the meta-schemas jsonschema ships and nothing else: never a network fetch."""
    return referencing.Registry(retrieve=_refuse_retrieval)  # type: ignore[call-arg]


def _resource(schema: Mapping[str, Any]) -> referencing.Resource[Any]:
    return referencing.Resource.from_contents(
        schema, default_specification=referencing.jsonschema.DRAFT202012)
