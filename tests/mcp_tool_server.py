"""A real MCP server, written with the official SDK, for the tests to connect to.

    python tests/mcp_tool_server.py stdio        serves on standard input and output
    python tests/mcp_tool_server.py http [PORT]  serves Streamable HTTP on 127.0.0.1 (PORT, or
                                                 a free one), prints "mcp listening on URL"

Its `tally` tool counts its executions per label, at the tool: over HTTP, GET /tallies
answers them as JSON ({label: executions}), so a test counts what ran whatever the gateway
recorded.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections import Counter
from typing import Annotated

import uvicorn
from mcp.server.mcpserver import MCPServer
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse

server = MCPServer("test-tools")
#: Executions of `tally` per label.
tallies: Counter[str] = Counter()


@server.tool(description="Adds two integers.")
def add(a: int, b: int) -> str:
    return str(a + b)


@server.tool(description="Returns the text it is given, repeated `times` times.")
def echo(text: str, times: int = 1) -> str:
    return text * times


@server.tool(description="Always fails.")
def broken() -> str:
    raise ValueError("the broken tool is broken")


@server.tool(description="Sleeps for `seconds`, then says so.")
async def sleep(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return f"slept {seconds}s"


@server.tool(description="Its schema asks for a string of up to 100,000 characters, which "
                         "an engine would expand into a grammar that crashes llama.cpp.")
def hostile(text: Annotated[str, Field(max_length=100_000)]) -> str:
    return text


@server.tool(description="Counts a call under `label` (a side effect: not idempotent).")
def tally(label: str) -> str:
    tallies[label] += 1
    return f"{label}: execution {tallies[label]}"


@server.custom_route("/tallies", methods=["GET"])
async def read_tallies(request: Request) -> JSONResponse:
    return JSONResponse(dict(tallies))


async def serve_http(port: int) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
    config = uvicorn.Config(server.streamable_http_app(), log_level="warning", lifespan="on")
    http = uvicorn.Server(config)
    serving = asyncio.create_task(http.serve(sockets=[sock]))
    while not http.started and not serving.done():
        await asyncio.sleep(0.01)
    print(f"mcp listening on {url}", flush=True)
    await serving


def main(argv: list[str]) -> int:
    if argv == ["stdio"]:
        server.run("stdio")
    elif argv[:1] == ["http"] and len(argv) <= 2:
        asyncio.run(serve_http(int(argv[1]) if len(argv) == 2 else 0))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
