"""The `agentloop` command line: `serve` runs the gateway, `health` probes one.

Expected failures print one line to stderr and exit non-zero; no tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentloop.config import Settings, SettingsError, add_settings_arguments, load_settings

EXIT_USAGE = 2
EXIT_UNHEALTHY = 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentloop", description=__doc__)
    commands = parser.add_subparsers(title="commands")
    for name, helptext, configure, run in COMMANDS:
        sub = commands.add_parser(name, help=helptext, description=helptext)
        configure(sub)
        sub.set_defaults(run=run)
    return parser


# --- serve -------------------------------------------------------------------------------

def _configure_serve(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser)


def _run_serve(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    if settings.workers == 1:
        _serve_one(settings, 0)
        return 0
    from agentloop.workers import run_workers

    return run_workers(settings, _serve_one)


def _serve_one(settings: Settings, worker: int) -> None:
    """One server process: its own logging, event loop, backend and gRPC server."""
    from agentloop.server import serve

    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker-{worker} %(name)s: %(message)s",
    )
    asyncio.run(serve(settings))


# --- health ------------------------------------------------------------------------------

def _configure_health(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="127.0.0.1:50051", help="server HOST:PORT")
    parser.add_argument(
        "--service", default="readiness",
        help="health service name: readiness, liveness, agentloop.v1.AgentLoopService or ''",
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")


def _run_health(args: argparse.Namespace) -> int:
    """Exit 0 only when the service reports SERVING."""
    with grpc.insecure_channel(args.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"agentloop: health check failed: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            return EXIT_UNHEALTHY
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_UNHEALTHY


Command = tuple[str, str, Callable[[argparse.ArgumentParser], None],
                Callable[[argparse.Namespace], int]]

COMMANDS: list[Command] = [
    ("serve", "run the gateway (all settings as flags or AGENTLOOP_* variables)",
     _configure_serve, _run_serve),
    ("health", "check a server's gRPC health; exit 0 only on SERVING",
     _configure_health, _run_health),
]


if __name__ == "__main__":
    sys.exit(main())
