"""A real PostgreSQL server for the tests: Debian's `postgresql` package (`make postgres-tools`
installs it), started with initdb and pg_ctl as the `postgres` user (initdb refuses root) in a
temporary directory on a free port. Tests that need it skip, saying why, where none can run."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    #: pg_ctl and its arguments to start and stop this server (a test may stop it a while).
    control: tuple[str, ...] = ()
    start_options: tuple[str, ...] = ()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def stop(self) -> None:
        subprocess.run([*self.control, "-m", "fast", "stop"], check=True, capture_output=True,
                       timeout=60)

    def start(self) -> None:
        subprocess.run([*self.control, *self.start_options, "start"], check=True,
                       capture_output=True, timeout=120)


def _binaries() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


def why_no_server() -> str | None:
    """Why no PostgreSQL server can run here, or None."""
    if _binaries() is None:
        return "PostgreSQL is not installed (make postgres-tools installs Debian's package)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no `postgres` user to run initdb as"
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != "postgres":
        return "the tests run neither as root nor as postgres: initdb cannot run as postgres"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a throwaway server; stop it and delete its files afterwards."""
    why = why_no_server()
    if why is not None:
        pytest.skip(why)
    bin_dir = _binaries()
    assert bin_dir is not None
    root = tempfile.mkdtemp(prefix="agentloop-pg-")
    user = pwd.getpwnam("postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    os.chown(root, user.pw_uid, user.pw_gid)
    data = os.path.join(root, "data")
    port = _free_port()
    try:
        subprocess.run([*as_postgres, f"{bin_dir}/initdb", "-D", data, "-A", "trust", "-U",
                        "postgres", "--no-sync"], check=True, capture_output=True, timeout=120)
        server = PostgresServer(
            "127.0.0.1", port, (*as_postgres, f"{bin_dir}/pg_ctl", "-D", data, "-w", "-t", "60"),
            ("-l", os.path.join(root, "log"), "-o",
             f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"))
        server.start()
        yield server
    finally:
        subprocess.run([*as_postgres, f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate",
                        "stop"], capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)


async def fresh_database(server: PostgresServer) -> str:
    """A new empty database on the server; its URL."""
    import asyncpg

    name = "t_" + secrets.token_hex(6)
    db = await asyncpg.connect(server.url())
    try:
        await db.execute(f"CREATE DATABASE {name}")
    finally:
        await db.close()
    return server.url(name)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session (each test takes a fresh database)."""
    with postgres_server() as server:
        yield server
