"""`agentloop serve --workers N`: N server processes sharing one port (SO_REUSEPORT).

grpc.aio runs one event loop on one core; on a replica with several cores the kernel
spreads connections over N processes bound to the same port. The processes are forked
before any gRPC object exists (gRPC does not survive a fork with live channels or
servers), each then builds its own event loop, backend client and server. The parent only
forwards SIGTERM/SIGINT and reaps: if one worker dies, it stops the others and exits
non-zero so Kubernetes restarts the pod.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from agentloop.config import Settings

WorkerMain = Callable[[Settings, int], None]


def run_workers(settings: Settings, worker_main: WorkerMain) -> int:
    """Fork `settings.workers` children running `worker_main`; return the exit code."""
    children: dict[int, int] = {}
    for index in range(settings.workers):
        pid = os.fork()
        if pid == 0:  # the child
            code = 0
            try:
                worker_main(settings, index)
            except KeyboardInterrupt:
                pass
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            _signal_quietly(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)  # each worker re-reads the keys file
    exit_code = 0
    while children:
        pid, status = os.wait()
        if pid not in children:
            continue
        del children[pid]
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and exit_code == 0:
            exit_code = 1
            for other in children:  # one worker failed: take the replica down cleanly
                _signal_quietly(other, signal.SIGTERM)
    return exit_code


def _signal_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
