"""Tools the agent may call: the `Tool` protocol, a registry, and the built-in server tools.

A server tool is an object with a name, a description and a JSON Schema of its arguments
(all shown to the model) and an async `run`. Adding one is writing such a class and
registering it. A tool reports a failure the model can act on (bad input, division by
zero) by raising `ToolError`; the agent shows the message to the model as the observation.
There are deliberately no network or shell tools.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

#: What a tool name may look like (server and client tools alike).
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: The provider ListTools names for the tools built into the server.
BUILTIN = "builtin"
#: The arguments schema of a tool that takes any object.
ANY_OBJECT: Mapping[str, Any] = {"type": "object"}


class ToolError(Exception):
    """A tool failed in a way the model should hear about (the message becomes the observation)."""


class ToolDescription(Protocol):
    """What the model is told about a tool."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def parameters(self) -> Mapping[str, Any]:
        """JSON Schema of the tool's arguments (an object)."""
        ...


class Tool(ToolDescription, Protocol):
    """A tool the server runs itself."""

    async def run(self, arguments: Mapping[str, Any]) -> str:
        """Run with arguments already validated against `parameters`; raise ToolError on failure."""
        ...


def is_idempotent(tool: object) -> bool:
    """Is the tool declared safe to run twice (`idempotent = True`)? A run taken over by
    another replica runs a call whose result was not recorded again only then."""
    return getattr(tool, "idempotent", False) is True


@dataclass(frozen=True, slots=True)
class ClientTool:
    """A tool the client runs (StreamRunAgent): the server only knows its description."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: dict(ANY_OBJECT))


class ToolProvider(Protocol):
    """A source of server tools that come and go (the MCP servers)."""

    def available(self) -> Iterable[Tool]:
        """The tools that can run now."""
        ...

    def known(self, name: str) -> Tool | None:
        """A tool by name, available now or seen before (a run keeps the tools it began with)."""
        ...


class ToolRegistry:
    """The server tools by name: the built-in ones, then those of the providers.

    `names`, `in` and iteration give the tools available now; indexing also finds a
    provider's tool that went away, so a run that began with it hears of its failure as
    an observation rather than breaking."""

    def __init__(self, tools: Iterable[Tool] = (), providers: Iterable[ToolProvider] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)
        self._providers = list(providers)

    def register(self, tool: Tool) -> None:
        if not TOOL_NAME.match(tool.name):
            raise ValueError(f"bad tool name {tool.name!r}")
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    def add_provider(self, provider: ToolProvider) -> None:
        self._providers.append(provider)

    def _available(self) -> dict[str, Tool]:
        tools = dict(self._tools)
        for provider in self._providers:
            for tool in provider.available():
                tools.setdefault(tool.name, tool)  # a built-in keeps its name
        return tools

    def __getitem__(self, name: str) -> Tool:
        tool = self._tools.get(name)
        for provider in self._providers:
            tool = tool or provider.known(name)
        if tool is None:
            raise KeyError(name)
        return tool

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._available())

    def __contains__(self, name: object) -> bool:
        return name in self._available()

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._available().values())


def default_tools() -> ToolRegistry:
    """The server tools every agent run may use."""
    return ToolRegistry([Calculator(), CurrentTime()])


# --- calculator ----------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 256
MAX_EXPONENT = 1024
MAX_INTEGER_BITS = 4096

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


class Calculator:
    """Arithmetic on numbers, parsed with `ast` (never `eval`), with bounded sizes."""

    name = "calculator"
    #: Running it again gives the same result: a run taken over may call it again.
    idempotent = True
    # No example expression here, and no description of the argument: a small model
    # copies either into the call instead of the user's expression.
    description = (
        "Evaluates an arithmetic expression with numbers, parentheses and the operators "
        "+ - * / // % ** and returns the result."
    )
    parameters: Mapping[str, Any] = {
        "type": "object",
        "properties": {"expression": {"type": "string"}},
        "required": ["expression"],
        "additionalProperties": False,
    }

    async def run(self, arguments: Mapping[str, Any]) -> str:
        return format_number(evaluate(arguments["expression"]))


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; ToolError for anything else."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None
    try:
        return _value(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except (OverflowError, RecursionError):
        raise ToolError("the result is too large") from None


def _value(node: ast.expr) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise ToolError("^ is not a power here; write ** (e.g. 2 ** 10)")
    raise ToolError(f"unsupported in arithmetic: {ast.unparse(node)!r}")


def _check_power(base: int | float, exponent: int | float) -> None:
    # Refuse before computing: 9 ** 9 ** 9 would take the server down.
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"exponents are limited to ±{MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if base.bit_length() * exponent > MAX_INTEGER_BITS:
            raise ToolError("the result is too large")


def _bounded(value: int | float | complex) -> int | float:
    if isinstance(value, complex):  # (-8) ** 0.5
        raise ToolError("the result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_INTEGER_BITS:
        raise ToolError("the result is too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("the result is too large")
    return value


def format_number(value: int | float) -> str:
    """Integers as integers; floats with a whole value lose their ".0"."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


# --- current_time --------------------------------------------------------------------------


class CurrentTime:
    """The current date and time in UTC."""

    name = "current_time"
    idempotent = True
    description = (
        "Returns the current date and time in UTC, in ISO 8601."
    )
    parameters: Mapping[str, Any] = {
        "type": "object", "properties": {}, "additionalProperties": False,
    }

    async def run(self, arguments: Mapping[str, Any]) -> str:
        return datetime.now(UTC).isoformat(timespec="seconds")
