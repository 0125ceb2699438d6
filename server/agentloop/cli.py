"""The `agentloop` command line: `serve` runs the gateway; `health`, `generate`, `agent`,
`embed`, `tokens` and `models` call one (through agentloop_client).

Expected failures print one line to stderr and exit non-zero; no tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import errno
import functools
import importlib.metadata
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

import grpc
from google.protobuf import duration_pb2, json_format
from google.protobuf.message import Message

from agentloop.config import (
    Settings,
    SettingsError,
    add_settings_arguments,
    env_name,
    flag_name,
    load_settings,
    parse_host_port,
)
from agentloop.health import LIVENESS, READINESS, SERVICE_NAME
from agentloop.v1 import agentloop_pb2 as pb
from agentloop_client import DEFAULT_ADDRESS, SESSION_HEADER, AgentLoopClient, AgentLoopError
from agentloop_client.channel import DEFAULT_TIMEOUT

EXIT_USAGE = 2
EXIT_UNHEALTHY = 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command_parser = getattr(args, "command_parser", parser)
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}"
                             + _did_you_mean(unknown, command_parser))
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.run(args)
    except SettingsError as exc:
        print(f"agentloop: invalid setting: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


class _Parser(argparse.ArgumentParser):
    """argparse whose errors come first, with a suggestion, and one short usage line after
    (the full usage, some 70 lines for `serve`, only on --help)."""

    def error(self, message: str) -> NoReturn:
        invalid = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if invalid:
            choices = re.findall(r"'([^']*)'", invalid.group(2))
            matches = difflib.get_close_matches(invalid.group(1), choices, n=1)
            if matches:
                message += f"; did you mean {matches[0]!r}?"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n{_short_usage(self)}\n")


def _short_usage(parser: argparse.ArgumentParser) -> str:
    """`usage: agentloop generate [options] prompt (--help lists them)`: the positionals only."""
    formatter = parser.formatter_class(prog=parser.prog, width=10_000)
    formatter.add_usage(None, [a for a in parser._actions if not a.option_strings], [])
    positionals = formatter.format_help().strip().removeprefix(f"usage: {parser.prog}")
    return f"usage: {parser.prog} [options]{positionals} ({parser.prog} --help lists them)"


def _did_you_mean(unknown: Sequence[str], parser: argparse.ArgumentParser) -> str:
    """` (did you mean --y?)` for the mistyped flags among `unknown`, else ''."""
    flags = [option for action in parser._actions for option in action.option_strings]
    hints = []
    for word in unknown:
        if word.startswith("-"):
            typed = word.split("=", 1)[0]
            matches = difflib.get_close_matches(typed, flags, n=1)
            hints += [(typed, matches[0])] if matches else []
    if len(hints) == 1:
        return f" (did you mean {hints[0][1]}?)"
    if hints:
        return f" (did you mean {', '.join(f'{meant} for {typed}' for typed, meant in hints)}?)"
    return ""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="agentloop", description=__doc__)
    parser.add_argument("--version", action="version", version=f"agentloop {_version()}")
    commands = parser.add_subparsers(title="commands", parser_class=_Parser)
    for name, helptext, configure, run in COMMANDS:
        sub = commands.add_parser(name, help=helptext, description=helptext)
        configure(sub)
        # Errors in a command's arguments are reported with that command's usage.
        sub.set_defaults(run=run, command_parser=sub)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("agentloop")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


# --- serve -------------------------------------------------------------------------------

def _configure_serve(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser)


def _run_serve(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    # Before anything slow (loading a model): a second `make run` fails in one line.
    ensure_listen_address_free(settings.listen)
    if settings.workers == 1:
        _serve_one(settings, 0)
        return 0
    from agentloop.workers import run_workers

    return run_workers(settings, _serve_one)


def ensure_listen_address_free(listen: str) -> None:
    """Raise SettingsError when nothing could listen on `listen` (HOST:PORT) right now."""
    host, port = parse_host_port(listen)
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            # As gRPC does: connections of a previous server in TIME_WAIT do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        why = ("already in use (another server listens there)"
               if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc)))
        raise SettingsError(f"{flag_name('listen')} / {env_name('listen')}: cannot listen on "
                            f"{listen}: {why}; choose another HOST:PORT") from None


def _serve_one(settings: Settings, worker: int) -> None:
    """One server process: its own logging, event loop, backend and gRPC server."""
    from agentloop.server import serve
    from agentloop.telemetry.logs import setup_logging
    from agentloop.telemetry.metrics import for_worker

    setup_logging(settings.log_level, worker)
    try:
        import uvloop
    except ImportError:  # platforms without uvloop (Windows) run asyncio's own loop
        asyncio.run(serve(for_worker(settings, worker)))
        return
    # uvloop's event loop cuts the gateway's CPU per relayed token by about a fifth.
    uvloop.run(serve(for_worker(settings, worker)))


# --- client commands: shared flags, errors, progress ---------------------------------------

EXIT_FAILED = 1


def _add_client_arguments(parser: argparse.ArgumentParser, timeout: float) -> None:
    parser.add_argument(
        "--address", default=os.environ.get("AGENTLOOP_ADDRESS", DEFAULT_ADDRESS),
        help=f"server HOST:PORT or gRPC target, e.g. dns:///host:port "
             f"(env AGENTLOOP_ADDRESS, default {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--timeout", type=float, default=timeout,
                        help=f"seconds the call may take (default {timeout:g})")
    parser.add_argument("--api-key", default=os.environ.get("AGENTLOOP_API_KEY"),
                        help="sent as a bearer token (env AGENTLOOP_API_KEY)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--session", default=None,
                        help=f"conversation id sent as {SESSION_HEADER}: with a dns:/// name or "
                             "an address list, every call of a session goes to one replica")


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="model name (default: the server's)")
    parser.add_argument("--system", default="", help="system prompt")
    parser.add_argument("--json", action="store_true",
                        help="print each streamed message as one JSON line")
    options = parser.add_argument_group("sampling options (unset: the server's defaults)")
    options.add_argument("--temperature", type=float)
    options.add_argument("--top-p", type=float)
    options.add_argument("--top-k", type=int)
    options.add_argument("--max-tokens", type=int)
    options.add_argument("--seed", type=int)
    options.add_argument("--stop", action="append", default=[],
                         help="stop sequence (repeatable)")
    options.add_argument("--repeat-penalty", type=float)
    options.add_argument("--num-ctx", type=int)


_OPTION_NAMES = ("temperature", "top_p", "top_k", "max_tokens", "seed", "repeat_penalty",
                 "num_ctx")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        name: getattr(args, name) for name in _OPTION_NAMES if getattr(args, name) is not None
    }
    if args.stop:
        options["stop"] = args.stop
    return options


def _text_argument(value: str) -> str:
    """`-` reads the text from standard input."""
    return sys.stdin.read() if value == "-" else value


def _client(args: argparse.Namespace) -> AgentLoopClient:
    return AgentLoopClient(args.address, timeout=args.timeout, api_key=args.api_key or None,
                           tls=args.tls, session=args.session or None)


def _client_command(run: Callable[[argparse.Namespace], int]
                    ) -> Callable[[argparse.Namespace], int]:
    """Expected failures become one line on stderr and exit code 1."""

    @functools.wraps(run)
    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except AgentLoopError as exc:
            print(f"agentloop: {_describe_error(exc, args.address)}", file=sys.stderr)
            return EXIT_FAILED
        except BrokenPipeError:  # e.g. `agentloop generate ... | head -1`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_FAILED

    return guarded


def _describe_error(exc: AgentLoopError, address: str) -> str:
    text = f"{exc.code.name}: {exc.message}"
    # The server's own UNAVAILABLE always carries ErrorInfo; a bare one is the transport's.
    if exc.code is grpc.StatusCode.UNAVAILABLE and exc.error_info is None:
        return _describe_transport_failure(text, address)
    if exc.field_violations:
        text = f"{exc.code.name}: " + "; ".join(
            f"{name}: {why}" for name, why in exc.field_violations.items())
    if exc.retry_delay is not None:
        text += f" (retry in {exc.retry_delay:g}s)"
    return text


_CONNECT_FAILURES = ("failed to connect", "connection refused", "dns resolution failed",
                     "name resolution", "no route to host", "connect failed")


def _describe_transport_failure(text: str, address: str) -> str:
    """Never connected, or a connection that was closed under the call: say which."""
    lowered = text.lower()
    if "too_many_pings" in lowered or "too many pings" in lowered:
        return (f"the server at {address} closed the connection because this client sent "
                f"keepalive pings more often than the server's --min-ping-interval allows "
                f"({text})")
    if any(failure in lowered for failure in _CONNECT_FAILURES):
        return f"cannot reach a server at {address} ({text})"
    return f"the connection to the server at {address} was closed during the call ({text})"


class _Progress:
    """A spinner with elapsed seconds on stderr while waiting, only if stderr is a terminal."""

    FRAMES = "|/-\\"

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._enabled = stream.isatty()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def show(self, label: str) -> None:
        if not self._enabled or self._thread is not None:
            return
        self._stopped.clear()
        self._thread = threading.Thread(target=self._spin, args=(label,), daemon=True)
        self._thread.start()

    def clear(self) -> None:
        if self._thread is None:
            return
        self._stopped.set()
        self._thread.join()
        self._thread = None
        self._stream.write("\r\033[K")
        self._stream.flush()

    def _spin(self, label: str) -> None:
        started = time.monotonic()
        frame = 0
        while not self._stopped.wait(0.1):
            elapsed = time.monotonic() - started
            self._stream.write(f"\r{self.FRAMES[frame % 4]} {label}... {elapsed:.1f}s")
            self._stream.flush()
            frame += 1


def _json_line(message: Message) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _seconds(value: duration_pb2.Duration) -> float:
    return value.ToNanoseconds() / 1e9


# --- health ------------------------------------------------------------------------------

def _configure_health(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--service", default=READINESS,
        help=f"health service name: {READINESS}, {LIVENESS}, {SERVICE_NAME} or ''",
    )
    _add_client_arguments(parser, timeout=3.0)


@_client_command
def _run_health(args: argparse.Namespace) -> int:
    """Exit 0 only when the service reports SERVING."""
    with _client(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else EXIT_UNHEALTHY


# --- generate ----------------------------------------------------------------------------

def _configure_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt; - reads it from standard input")
    _add_generation_arguments(parser)
    parser.add_argument("--format", default=None,
                        help="text, json, or a JSON Schema (inline, or @FILE)")
    parser.add_argument("--tool", action="append", default=[], dest="tools",
                        metavar="NAME[=SCHEMA]",
                        help="a function the model may call, with the JSON Schema of its "
                             "arguments (inline, or @FILE; none: any object); repeatable. "
                             "The prompt goes as a user message; calls print as lines "
                             "`tool call ID NAME ARGUMENTS`")
    parser.add_argument("--tool-choice", default=None, metavar="auto|none|required|NAME",
                        help="whether the model may, must or must not call the tools, or "
                             "which one it must call (default: auto)")
    _add_client_arguments(parser, timeout=DEFAULT_TIMEOUT)


def _response_format(value: str | None) -> str | None:
    if value is None or value in ("text", "json"):
        return value
    if value.startswith("@"):
        with open(value[1:], encoding="utf-8") as schema:
            return schema.read()
    return value


def _tools(values: list[str]) -> list[pb.ToolDefinition]:
    """`--tool NAME[=SCHEMA]` values as tool definitions (the server checks them)."""
    tools = []
    for value in values:
        name, _, schema = value.partition("=")
        tools.append(pb.ToolDefinition(name=name,
                                       parameters_json_schema=_response_format(schema) or ""))
    return tools


def _tool_choice(value: str | None) -> str | dict[str, str] | None:
    if value is None or value in ("auto", "none", "required"):
        return value
    return {"name": value}


@_client_command
def _run_generate(args: argparse.Namespace) -> int:
    """Stream the completion to stdout as the tokens arrive."""
    prompt = _text_argument(args.prompt)
    progress = _Progress(sys.stderr)
    last: pb.StreamGenerateResponse | None = None
    tools = _tools(args.tools)
    with _client(args) as client:
        # Tools need a chat: the prompt goes as its one user message.
        chat = {"messages": [{"role": "user", "content": prompt}]} if tools else {
            "prompt": prompt}
        responses = client.stream_generate(
            **chat, system=args.system, model=args.model, options=_options(args),
            format=_response_format(args.format), tools=tools,
            tool_choice=_tool_choice(args.tool_choice))
        progress.show("waiting for the first token")
        try:
            for last in responses:
                progress.clear()
                sys.stdout.write(_json_line(last) + "\n" if args.json else last.text)
                sys.stdout.flush()
        finally:
            progress.clear()
    if not args.json:
        sys.stdout.write("\n")
        for call in last.tool_calls if last is not None else ():
            print(f"tool call {call.id} {call.name} {call.arguments_json}")
        if last is not None and sys.stderr.isatty():
            print(f"[{pb.FinishReason.Name(last.finish_reason).removeprefix('FINISH_REASON_')}"
                  f", {last.usage.output_tokens} tokens in "
                  f"{_seconds(last.timings.total_duration):.2f}s, first after "
                  f"{_seconds(last.timings.time_to_first_token):.2f}s]", file=sys.stderr)
    return 0


# --- agent -------------------------------------------------------------------------------

def _configure_agent(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("goal", help="what the agent should achieve; - reads it from stdin")
    parser.add_argument("--tool", action="append", default=[], dest="tools",
                        help="a server tool the agent may use (repeatable; default: all)")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="most steps (default: the server's)")
    _add_generation_arguments(parser)
    _add_client_arguments(parser, timeout=DEFAULT_TIMEOUT)


@_client_command
def _run_agent(args: argparse.Namespace) -> int:
    """Show every step of the run as it happens (StreamRunAgent); exit 0 on a final answer."""
    goal = _text_argument(args.goal)
    progress = _Progress(sys.stderr)
    finished: pb.AgentFinished | None = None
    with _client(args) as client:
        events = client.stream_run_agent(
            goal, tools=args.tools, max_steps=args.max_steps, system=args.system,
            model=args.model, options=_options(args))
        progress.show("starting")
        try:
            for event in events:
                kind = event.WhichOneof("event")
                if kind in ("answer_delta", "answer_withdrawn") and not args.json:
                    continue  # the answer is shown whole when the run finishes
                progress.clear()
                print(_json_line(event) if args.json else _describe_event(event), flush=True)
                if kind == "finished":
                    finished = event.finished
                else:
                    progress.show("running the tool" if kind == "tool_call" else "thinking")
        finally:
            progress.clear()
    if finished is None or finished.stop_reason != pb.AGENT_STOP_REASON_FINAL_ANSWER:
        return EXIT_FAILED
    return 0


def _describe_event(event: pb.StreamRunAgentResponse) -> str:
    kind = event.WhichOneof("event")
    if kind == "step_started":
        return f"step {event.step_started.step}"
    if kind == "thought":
        return f"  thought: {event.thought.thought}"
    if kind == "tool_call":
        call = event.tool_call
        where = " (client tool)" if call.client_tool else ""
        return f"  call: {call.tool} {call.arguments_json}{where}"
    if kind == "tool_result":
        result = event.tool_result
        label = "error" if result.is_error else "result"
        cut = " [truncated]" if result.observation_truncated else ""
        return f"  {label}: {result.observation}{cut} ({_seconds(result.duration):.2f}s)"
    end = event.finished
    reason = pb.AgentStopReason.Name(end.stop_reason).removeprefix("AGENT_STOP_REASON_")
    summary = (f"[{reason}, {end.steps} steps, {end.usage.output_tokens} tokens, "
               f"{_seconds(end.duration):.2f}s]")
    if end.stop_reason == pb.AGENT_STOP_REASON_FINAL_ANSWER:
        return f"answer: {end.final_answer}\n{summary}"
    return f"no answer: the run stopped ({reason})\n{summary}"


# --- embed and tokens --------------------------------------------------------------------

def _texts_argument(values: Sequence[str]) -> list[str]:
    """The texts of the command line; a lone `-` reads one text per line from stdin."""
    if list(values) == ["-"]:
        return [line for line in sys.stdin.read().splitlines() if line.strip()]
    return list(values)


def _configure_embed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("texts", nargs="+",
                        help="the texts to embed; a lone - reads one text per line from stdin")
    parser.add_argument("--model", default="", help="model name (default: the server's)")
    parser.add_argument("--dimensions", type=int, default=0,
                        help="shorter vectors (Matryoshka models only; default: the model's)")
    parser.add_argument("--truncate", action="store_true",
                        help="cut a text longer than the model's context instead of failing")
    parser.add_argument("--raw", action="store_true",
                        help="do not normalize the vectors to length 1")
    parser.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    _add_client_arguments(parser, timeout=DEFAULT_TIMEOUT)


@_client_command
def _run_embed(args: argparse.Namespace) -> int:
    """One vector per text, one JSON array per line, in the texts' order."""
    with _client(args) as client:
        reply = client.embed(_texts_argument(args.texts), model=args.model,
                             normalize=not args.raw, truncate=args.truncate,
                             dimensions=args.dimensions)
    if args.json:
        print(_json_line(reply))
        return 0
    for embedding in reply.embeddings:
        print(json.dumps([round(value, 7) for value in embedding.values]))
    if sys.stderr.isatty():
        print(f"[{len(reply.embeddings)} vectors of {reply.dimensions} dimensions from "
              f"{reply.model}, {reply.usage.input_tokens} tokens]", file=sys.stderr)
    return 0


_ROLE_NAMES = ("system", "user", "assistant", "tool")


def _chat_message(value: str) -> dict[str, str]:
    role, sep, content = value.partition(":")
    if not sep or role not in _ROLE_NAMES:
        raise argparse.ArgumentTypeError(
            f"expected ROLE:TEXT with ROLE one of {', '.join(_ROLE_NAMES)}, got {value!r}")
    return {"role": role, "content": content}


def _configure_tokens(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("texts", nargs="*",
                        help="texts counted one by one; a lone - reads one per line from stdin")
    parser.add_argument("--message", action="append", default=[], type=_chat_message,
                        dest="messages", metavar="ROLE:TEXT",
                        help="a chat turn (repeatable, in order): the chat is counted whole, "
                             "as generate sends it")
    parser.add_argument("--system", default="", help="the chat's system prompt")
    parser.add_argument("--model", default="", help="model name (default: the server's)")
    parser.add_argument("--json", action="store_true", help="print the reply as JSON")
    _add_client_arguments(parser, timeout=30.0)


@_client_command
def _run_tokens(args: argparse.Namespace) -> int:
    """One count per line (per text, or the chat's), then the total and the context."""
    with _client(args) as client:
        reply = client.count_tokens(_texts_argument(args.texts), messages=args.messages,
                                    system=args.system, model=args.model)
    if args.json:
        print(_json_line(reply))
        return 0
    for count in reply.counts:
        print(count)
    room = f" of {reply.context_length} the context holds" if reply.context_length else ""
    print(f"total {reply.total_tokens} tokens{room} ({reply.model})")
    return 0


# --- models ------------------------------------------------------------------------------

def _configure_models(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the reply as JSON")
    _add_client_arguments(parser, timeout=10.0)


@_client_command
def _run_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.list_models()
    if args.json:
        print(_json_line(reply))
        return 0
    rows = [("NAME", "SIZE", "LOADED", "FAMILY", "PARAMETERS", "QUANTIZATION", "EMBEDS")]
    for model in reply.models:
        name = model.name + (" *" if model.name == reply.default_model else "")
        embeds = (f"{model.embedding_dimensions or '?'} dimensions" if model.embeds else "no")
        rows.append((name, f"{model.size_bytes / 1e9:.1f} GB", "yes" if model.loaded else "no",
                     model.family, model.parameter_size, model.quantization_level, embeds))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    print(f"backend {reply.backend}; * marks the default model ({reply.default_model})")
    return 0


Command = tuple[str, str, Callable[[argparse.ArgumentParser], None],
                Callable[[argparse.Namespace], int]]

COMMANDS: list[Command] = [
    ("serve", "run the gateway (all settings as flags or AGENTLOOP_* variables)",
     _configure_serve, _run_serve),
    ("health", "check a server's gRPC health; exit 0 only on SERVING",
     _configure_health, _run_health),
    ("generate", "stream a completion to the terminal as the tokens arrive",
     _configure_generate, _run_generate),
    ("agent", "run the agent loop on a goal, showing each step as it happens",
     _configure_agent, _run_agent),
    ("embed", "embed texts: one vector per text, one JSON array per line",
     _configure_embed, _run_embed),
    ("tokens", "count the tokens of texts or a chat, with the model's context length",
     _configure_tokens, _run_tokens),
    ("models", "list the backend's models", _configure_models, _run_models),
]


if __name__ == "__main__":
    sys.exit(main())
