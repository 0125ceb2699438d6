"""A raw HTTP/2 gRPC client for transport tests: it does what a hostile caller may do.

grpcio's own client always reads and always follows the rules; the callers these tests
play never read (an initial flow-control window of 0 and no WINDOW_UPDATE), never send
their first message (headers only), send compressed bombs, or open more streams than the
server allows. `RawGrpcConnection` speaks HTTP/2 with the `h2` package over a real
loopback socket and keeps what the server sent per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings


class _UnlimitedClient(h2.connection.H2Connection):
    """An h2 client that opens streams past the server's SETTINGS_MAX_CONCURRENT_STREAMS,
    as a hostile caller would (h2 itself refuses to)."""

    @property
    def open_outbound_streams(self) -> int:  # type: ignore[override]
        return 0


@dataclass
class StreamState:
    """What the server sent on one stream."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    reset: int | None = None  # the RST_STREAM error code
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def grpc_status(self) -> int | None:
        for name, value in [*self.trailers, *self.headers]:
            if name == "grpc-status":
                return int(value)
        return None

    def header(self, name: str) -> str | None:
        return next((v for n, v in [*self.trailers, *self.headers] if n == name), None)


def grpc_frame(message: bytes, *, compress: bool = False) -> bytes:
    """One gRPC length-prefixed message (gzip-compressed when `compress`)."""
    payload = gzip.compress(message, compresslevel=9) if compress else message
    return struct.pack(">BI", 1 if compress else 0, len(payload)) + payload


class RawGrpcConnection:
    """One HTTP/2 connection to a gRPC server, driven frame by frame.

    `window` is the initial stream window the client advertises: 0 means the server can
    send no DATA on any stream (a caller that never reads). Received data is never
    acknowledged with WINDOW_UPDATE unless `reads` is True."""

    def __init__(self, address: str, *, window: int = 65535, reads: bool = True,
                 obey_stream_limit: bool = True) -> None:
        self.host, _, port = address.rpartition(":")
        self.port = int(port)
        self.reads = reads
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        cls = h2.connection.H2Connection if obey_stream_limit else _UnlimitedClient
        self.h2 = cls(config=config)
        self.h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
                                         h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.streams: dict[int, StreamState] = {}
        self.closed = asyncio.Event()  # the server closed the connection (or sent GOAWAY)
        self.goaway = False
        self.remote_settings_seen = asyncio.Event()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawGrpcConnection:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self.h2.initiate_connection()
        await self.flush()
        self._task = asyncio.create_task(self._read())
        await asyncio.wait_for(self.remote_settings_seen.wait(), 10)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def flush(self) -> None:
        assert self._writer is not None
        data = self.h2.data_to_send()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    def start_call(self, method: str, *, metadata: tuple[tuple[str, str], ...] = (),
                   compressed: bool = False) -> int:
        """Send a call's HEADERS (no message yet); the stream id. Call flush() after."""
        stream_id = self.h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"), (":scheme", "http"), (":path", method),
            (":authority", f"{self.host}:{self.port}"), ("content-type", "application/grpc"),
            ("te", "trailers"), *metadata,
        ]
        if compressed:
            headers.append(("grpc-encoding", "gzip"))
        self.h2.send_headers(stream_id, headers)
        self.streams[stream_id] = StreamState()
        return stream_id

    def send_message(self, stream_id: int, message: bytes, *, compress: bool = False,
                     end: bool = True) -> None:
        """Queue one gRPC message on the stream (within the flow-control window)."""
        self.h2.send_data(stream_id, grpc_frame(message, compress=compress), end_stream=end)

    async def call(self, method: str, message: bytes, *, end: bool = True,
                   metadata: tuple[tuple[str, str], ...] = (), compress: bool = False) -> int:
        """Start a call and send its one message; the stream id."""
        stream_id = self.start_call(method, metadata=metadata, compressed=compress)
        self.send_message(stream_id, message, compress=compress, end=end)
        await self.flush()
        return stream_id

    async def ended(self, stream_id: int, timeout: float = 30.0) -> StreamState:
        """The stream once the server ended it (trailers or RST_STREAM)."""
        state = self.streams[stream_id]
        await asyncio.wait_for(state.ended.wait(), timeout)
        return state

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while data := await self._reader.read(65536):
                for event in self.h2.receive_data(data):
                    self._on(event)
                await self.flush()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.closed.set()
            for state in self.streams.values():
                state.ended.set()

    def _on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.remote_settings_seen.set()
            return
        if isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True
            return
        stream_id = getattr(event, "stream_id", None)
        state = self.streams.get(stream_id) if stream_id else None
        if state is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            state.headers = list(event.headers)
        elif isinstance(event, h2.events.TrailersReceived):
            state.trailers = list(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            state.data += event.data
            if self.reads:
                self.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
        elif isinstance(event, h2.events.StreamReset):
            state.reset = event.error_code
            state.ended.set()
        elif isinstance(event, h2.events.StreamEnded):
            state.ended.set()


@contextlib.asynccontextmanager
async def raw_connection(address: str, **kwargs: object) -> AsyncIterator[RawGrpcConnection]:
    connection = RawGrpcConnection(address, **kwargs)  # type: ignore[arg-type]
    async with connection:
        yield connection
