"""Tools of Model Context Protocol servers, as server tools of the agent.

The operator lists MCP servers in a file (`--mcp-servers`, JSON or YAML; never from a
request): stdio commands the gateway starts, or Streamable HTTP URLs, each with its own
timeouts. The official `mcp` SDK talks to them. Each server's tools join the registry as
`<server>__<tool>` with the server's own JSON Schemas and run like built-in tools: the
agent's timeouts, observation cap, span and metrics apply; a failure is an observation.

Every server has a supervising task that connects, lists the tools, and then re-lists them
every `refresh` seconds, which also notices a server that went away. A server that cannot
be reached makes its tools unavailable (left out of ListTools and of the tools a run may
name) and is retried with backoff; it never stops the agent or changes readiness. The
tasks start with the server and end at shutdown, closing their sessions (a stdio server's
process ends with its session).

    servers:
      files:                       # tools named files__<tool>
        command: mcp-server-files  # stdio: the command and its arguments, env, cwd
        args: ["--root", "/srv/data"]
        timeout: 10                # seconds one tool call may take (default 10)
      search:
        url: http://127.0.0.1:8000/mcp   # Streamable HTTP
        headers: {Authorization: "Bearer ..."}
        connect_timeout: 5         # seconds to connect and list the tools (default 10)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import mcp_types
import yaml
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from agentloop.config import SettingsError
from agentloop.schema_limits import SchemaRefused, parse_schema
from agentloop.services.tools import ANY_OBJECT, TOOL_NAME, Tool, ToolError

log = logging.getLogger(__name__)

#: Joins a server's name and its tool's name into the registry's name.
SEPARATOR = "__"
SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,31}$")
_NOT_A_NAME_CHAR = re.compile(r"[^A-Za-z0-9_-]")
#: Seconds between reconnection attempts to a server that is down: doubling up to the max.
RETRY_MIN, RETRY_MAX = 1.0, 30.0
#: Most tools/list pages read from one server (a server that never stops paging is cut).
MAX_PAGES = 20
#: A tool's description goes into every run's instructions: this much of it, no more.
MAX_DESCRIPTION_CHARS = 1024
_SERVER_KEYS = {"command", "args", "env", "cwd", "url", "headers", "timeout", "connect_timeout",
                "refresh"}


@dataclass(frozen=True, slots=True)
class McpServerConfig:
    """One MCP server as the operator configured it: a stdio command or an HTTP URL."""

    name: str
    command: str = ""
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Seconds one tool call may take (the agent's --tool-timeout still caps it).
    timeout: float = 10.0
    #: Seconds to connect and list the tools.
    connect_timeout: float = 10.0
    #: Seconds between two listings of the tools (which also check the server is there).
    refresh: float = 30.0


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(McpServerConfig)}


def load_mcp_servers(path: str) -> tuple[McpServerConfig, ...]:
    """The servers listed in `path` (JSON or YAML); SettingsError naming what is wrong."""
    where = f"--mcp-servers / AGENTLOOP_MCP_SERVERS ({path})"
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"{where}: cannot read the file: {exc}") from None
    servers = document.get("servers") if isinstance(document, dict) else None
    if not isinstance(servers, dict):
        raise SettingsError(f"{where}: expected a mapping `servers: {{name: {{...}}}}`")
    return tuple(_server_config(name, entry, where) for name, entry in servers.items())


def _server_config(name: Any, entry: Any, where: str) -> McpServerConfig:
    def bad(why: str) -> SettingsError:
        return SettingsError(f"{where}: server {name!r}: {why}")

    if not isinstance(name, str) or not SERVER_NAME.match(name):
        raise bad("names are 1-32 letters, digits or '-', starting with a letter or digit")
    if not isinstance(entry, dict):
        raise bad("expected a mapping with `command` or `url`")
    unknown = set(entry) - _SERVER_KEYS
    if unknown:
        raise bad(f"unknown keys {sorted(unknown)}; known: {sorted(_SERVER_KEYS)}")
    if bool(entry.get("command")) == bool(entry.get("url")):
        raise bad("set exactly one of `command` (stdio) and `url` (Streamable HTTP)")
    url = str(entry.get("url") or "")
    if url and not re.match(r"^https?://", url):
        raise bad("`url` must be an http:// or https:// URL")
    args, env, headers = entry.get("args", []), entry.get("env", {}), entry.get("headers", {})
    if not isinstance(args, list) or not all(isinstance(a, str | int | float) for a in args):
        raise bad("`args` must be a list of strings")
    for key, value in (("env", env), ("headers", headers)):
        if not isinstance(value, dict):
            raise bad(f"`{key}` must be a mapping of strings")
    seconds = {}
    for key in ("timeout", "connect_timeout", "refresh"):
        value = entry.get(key, _DEFAULTS[key])
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise bad(f"`{key}` must be a number of seconds > 0")
        seconds[key] = float(value)
    return McpServerConfig(
        name=name, command=str(entry.get("command") or ""), args=tuple(map(str, args)),
        env={str(k): str(v) for k, v in env.items()}, cwd=entry.get("cwd"), url=url,
        headers={str(k): str(v) for k, v in headers.items()}, **seconds,
    )


def tool_name(server: str, remote: str) -> str | None:
    """`<server>__<tool>`, the tool's name made safe; None when it is too long."""
    name = f"{server}{SEPARATOR}{_NOT_A_NAME_CHAR.sub('_', remote)}"
    return name if TOOL_NAME.match(name) else None


def result_text(result: mcp_types.CallToolResult) -> str:
    """What the model is shown of a tool's result; ToolError when the tool reports one."""
    parts: list[str] = []
    for block in result.content:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource" and hasattr(block.resource, "text"):
            parts.append(block.resource.text)
        elif kind in ("resource", "resource_link"):
            uri = getattr(block, "uri", None) or getattr(block.resource, "uri", "")
            parts.append(f"[resource {uri}]")
        else:
            parts.append(f"[{kind or 'content'} {getattr(block, 'mime_type', '')}]".rstrip())
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    text = "\n".join(parts)
    if result.is_error:
        raise ToolError(text or "the tool reported an error")
    return text


@dataclass(frozen=True, slots=True)
class McpTool:
    """One tool of an MCP server, run through its server's session."""

    name: str
    remote_name: str
    description: str
    parameters: Mapping[str, Any]
    server: McpServer

    @property
    def provider(self) -> str:
        return self.server.name

    async def run(self, arguments: Mapping[str, Any]) -> str:
        return await self.server.call(self.remote_name, arguments)


class McpServer:
    """One configured server: its supervising task, its session, its tools."""

    def __init__(self, config: McpServerConfig) -> None:
        self.config = config
        self._client: Client | None = None
        #: Every tool the server listed since start, by registry name (a run keeps them).
        self._known: dict[str, McpTool] = {}
        #: The registry names of the tools of the last listing; empty while disconnected.
        self._available: tuple[str, ...] = ()
        self._task: asyncio.Task[None] | None = None
        #: Set once a listing has succeeded (what waits for the tools waits on it).
        self.listed = asyncio.Event()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def connected(self) -> bool:
        return self._client is not None

    def available(self) -> Iterable[Tool]:
        return [self._known[name] for name in self._available]

    def known(self, name: str) -> Tool | None:
        return self._known.get(name)

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"mcp-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            self._task = None

    async def call(self, remote_name: str, arguments: Mapping[str, Any]) -> str:
        client = self._client
        if client is None:
            raise ToolError(f"the MCP server {self.name} is not reachable now")
        timeout = self.config.timeout
        try:
            result = await client.call_tool(remote_name, dict(arguments),
                                            read_timeout_seconds=timeout)
        except MCPError as exc:
            if exc.error.code == mcp_types.REQUEST_TIMEOUT:
                raise ToolError(f"{self.name}{SEPARATOR}{remote_name} did not finish "
                                f"within {timeout:g}s") from None
            raise ToolError(exc.error.message) from None
        except Exception as exc:  # the session broke: the supervisor reconnects
            log.warning("MCP server %s: the call of %s failed: %r", self.name, remote_name, exc)
            raise ToolError(f"the MCP server {self.name} failed to answer") from None
        return result_text(result)

    # --- the session ---------------------------------------------------------------------

    async def _supervise(self) -> None:
        delay = RETRY_MIN
        while True:
            try:
                await self._session()
            except Exception as exc:  # down, refused, timed out, broke mid-session
                log.warning("MCP server %s unavailable (%s); retrying in %.0fs",
                            self.name, _reason(exc), delay)
            finally:
                self._client, self._available = None, ()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _session(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            # asyncio's timeout, not anyio's: the session's task group outlives this block.
            async with asyncio.timeout(self.config.connect_timeout):
                client = await stack.enter_async_context(self._client_for(stack))
                await self._list(client)
            self._client = client
            log.info("MCP server %s connected: %d tools", self.name, len(self._available))
            while True:
                await asyncio.sleep(self.config.refresh)
                async with asyncio.timeout(self.config.connect_timeout):
                    await self._list(client)

    def _client_for(self, stack: contextlib.AsyncExitStack) -> Client:
        config = self.config
        # "legacy": the initialize handshake every MCP server speaks.
        if config.command:
            return Client(StdioServerParameters(
                command=config.command, args=list(config.args), env=dict(config.env) or None,
                cwd=config.cwd), mode="legacy")
        http = httpx2.AsyncClient(headers=dict(config.headers),
                                  timeout=httpx2.Timeout(config.connect_timeout, read=None))
        stack.push_async_callback(http.aclose)
        return Client(streamable_http_client(config.url, http_client=http), mode="legacy")

    async def _list(self, client: Client) -> None:
        listed: list[mcp_types.Tool] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            page = await client.list_tools(cursor=cursor, cache_mode="refresh")
            listed += page.tools
            cursor = page.next_cursor
            if cursor is None:
                break
        # Checked on a thread: within the limits a check is bounded, not free.
        problems = await asyncio.to_thread(lambda: [schema_problem(remote) for remote in listed])
        available = []
        for remote, problem in zip(listed, problems, strict=True):
            name = tool_name(self.name, remote.name)
            if name is None or name in available:
                log.warning("MCP server %s: tool %r skipped (its name is too long or clashes)",
                            self.name, remote.name)
                continue
            if problem is not None:
                log.warning("MCP server %s: tool %r skipped (its input schema: %s)",
                            self.name, remote.name, problem)
                continue
            schema = remote.input_schema if isinstance(remote.input_schema, dict) else ANY_OBJECT
            description = (remote.description or remote.title or "")[:MAX_DESCRIPTION_CHARS]
            self._known[name] = McpTool(name, remote.name, description, dict(schema), self)
            available.append(name)
        self._available = tuple(available)
        self.listed.set()


def schema_problem(remote: mcp_types.Tool) -> str | None:
    """Why a tool's input schema may not reach an engine, or None. An MCP server is a third
    party: its schemas pass the limits a caller's schema passes (schema_limits)."""
    schema = remote.input_schema
    if not isinstance(schema, dict):
        return None  # no schema: any arguments object
    try:
        parse_schema(json.dumps(schema))
    except SchemaRefused as exc:
        return str(exc)[:300]
    except (ValueError, RecursionError):  # not JSON-encodable, or nested past Python's stack
        return "not a JSON Schema within the limits"
    return None


def _reason(exc: BaseException) -> str:
    """A one-line reason from an exception or the first leaf of an exception group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class McpServers:
    """The configured MCP servers, as a tool provider of the registry."""

    def __init__(self, configs: Iterable[McpServerConfig]) -> None:
        self.servers = [McpServer(config) for config in configs]

    @classmethod
    def from_file(cls, path: str) -> McpServers:
        return cls(load_mcp_servers(path))

    def start(self) -> None:
        for server in self.servers:
            server.start()

    async def close(self) -> None:
        await asyncio.gather(*(server.close() for server in self.servers))

    def available(self) -> Iterable[Tool]:
        for server in self.servers:
            yield from server.available()

    def known(self, name: str) -> Tool | None:
        server_name, separator, _ = name.partition(SEPARATOR)
        for server in self.servers:
            if separator and server.name == server_name:
                return server.known(name)
        return None
