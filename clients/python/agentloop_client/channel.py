"""Channel set-up every caller of agentloop needs: balancing, session affinity, retries,
keepalive, TLS, API key.

`ChannelConfig` holds the choices; `sync_channel` and `aio_channel` build a channel from
it whose interceptors add the default deadline, the `authorization` metadata and the session
header to every call, including calls made through the raw generated stub.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import grpc

SERVICE = "agentloop.v1.AgentLoopService"
#: The health service name that follows the backend (the server's own `liveness` does not).
READINESS = "readiness"
DEFAULT_ADDRESS = "127.0.0.1:50051"
#: Generous enough for a long generation on a CPU; pass `timeout=` per call to tighten.
DEFAULT_TIMEOUT = 300.0
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
#: Seconds between keepalive pings; the server allows one per 10 s (--min-ping-interval).
DEFAULT_KEEPALIVE = 30.0
#: Calls a retry could repeat work of: an agent run may have run tools before it failed.
AGENT_RUN_METHODS = ("RunAgent", "StreamRunAgent")

#: The metadata key naming a conversation. Balancers that hash it (this client's ring_hash
#: policy, Envoy's hash_policy, Istio's consistentHash) send every turn of a conversation to
#: the same replica, whose engine still holds the conversation so far in its cache.
SESSION_HEADER = "x-agentloop-session"
#: grpcio reads ring_hash's `requestHashHeader` (gRFC A76) only while this environment
#: variable is true, each time it parses a service config; otherwise it drops the field and
#: every pick fails with "hash attribute not present".
RING_HASH_HEADER_FLAG = "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"
#: gRPC core's name for the ring_hash policy in a service config.
RING_HASH_POLICY = "ring_hash_experimental"

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """How to reach the gateway.

    `address` may be `dns:///agentloop.ns.svc:50051` (a headless Service): round_robin then
    spreads calls over every replica. `retries` is gRPC's retry of calls that failed with
    UNAVAILABLE before the server sent anything (a draining or restarting replica), with
    exponential backoff; it never applies to RunAgent and StreamRunAgent, whose runs may
    have called tools before failing, unless `retry_agent_runs` says a repeated run is
    harmless. `keepalive` is the seconds between pings while calls are open (within the
    server's --min-ping-interval). `skip_unready` (default: on for `dns:` targets and
    address lists) turns on client-side health checking, so replicas whose `readiness` is
    NOT_SERVING get no calls; off, a single server answers for itself (its own statuses,
    and `health()` reads NOT_SERVING instead of failing).

    `session` names a conversation: every call carries it as the `x-agentloop-session`
    header, and on a balanced target the channel hashes that header (ring_hash) instead of
    taking turns (round_robin), so the conversation's turns land on one replica whose cache
    holds its prefix. A session moves only when its replica stops being ready (draining,
    gone): ring_hash then picks the next ready replica on the ring, and the call does not
    fail. `affinity` overrides when the channel hashes: True for a client that passes
    `session=` per call, False to send the header only (a mesh or gateway hashes it).
    Keep `skip_unready` on with affinity: ring_hash keeps a session on its replica while
    the connection is up, so without health checking a draining replica's refusals would
    be retried on that same replica until they run out.
    """

    address: str = DEFAULT_ADDRESS
    timeout: float | None = DEFAULT_TIMEOUT
    api_key: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    credentials: grpc.ChannelCredentials | None = None
    retries: int = 4
    retry_agent_runs: bool = False
    keepalive: float = DEFAULT_KEEPALIVE
    skip_unready: bool | None = None
    session: str | None = None
    affinity: bool | None = None
    options: Sequence[tuple[str, Any]] = field(default_factory=tuple)

    @property
    def metadata(self) -> Metadata:
        return (*_api_key_metadata(self.api_key), *session_metadata(self.session))

    @property
    def balanced_target(self) -> bool:
        """A target that resolves to several replicas: a `dns:` name or an address list."""
        return self.address.startswith("dns:") or "," in self.address

    @property
    def balances_replicas(self) -> bool:
        if self.skip_unready is not None:
            return self.skip_unready
        return self.balanced_target

    @property
    def hashes_sessions(self) -> bool:
        if self.affinity is not None:
            return self.affinity
        return bool(self.session) and self.balanced_target

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """None for plaintext; TLS when `tls`, `root_certificates` or `credentials` is set."""
        if self.credentials is not None:
            return self.credentials
        if self.tls or self.root_certificates is not None:
            return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
        return None

    def channel_options(self) -> list[tuple[str, Any]]:
        if self.hashes_sessions:
            enable_session_hashing()
        return [
            ("grpc.service_config", service_config(
                self.retries, self.balances_replicas, self.retry_agent_runs,
                self.hashes_sessions)),
            ("grpc.enable_retries", 1 if self.retries > 1 else 0),
            ("grpc.keepalive_time_ms", int(self.keepalive * 1000)),
            ("grpc.keepalive_timeout_ms", 20_000),
            # Keep pinging through a call that stays silent (a long generation's first
            # token): gRPC stops after 2 pings without data otherwise.
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *self.options,
        ]


def session_metadata(session: str | None) -> Metadata:
    """The session header for a call, or nothing."""
    return ((SESSION_HEADER, session),) if session else ()


def _api_key_metadata(api_key: str | None) -> Metadata:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def enable_session_hashing() -> None:
    """Let grpcio honour ring_hash's `requestHashHeader`. grpcio reads the variable when it
    parses a service config (at channel creation), so setting it here, before the channel is
    made, is enough even after other channels exist; it is forced on because a hashing
    channel without it fails every call."""
    os.environ[RING_HASH_HEADER_FLAG] = "true"


def service_config(max_attempts: int, skip_unready: bool = False,
                   retry_agent_runs: bool = False, hash_sessions: bool = False) -> str:
    """round_robin over every resolved address, or with `hash_sessions` ring_hash on the
    session header (a call without the header goes to a ready replica at random); only
    replicas whose `readiness` is SERVING with `skip_unready` (a draining replica leaves the
    rotation, and the ring, at once); retry UNAVAILABLE with backoff, agent runs only
    with `retry_agent_runs`."""
    policy = ({RING_HASH_POLICY: {"requestHashHeader": SESSION_HEADER}} if hash_sessions
              else {"round_robin": {}})
    config: dict[str, Any] = {"loadBalancingConfig": [policy]}
    if skip_unready:
        config["healthCheckConfig"] = {"serviceName": READINESS}
    if max_attempts > 1:
        config["methodConfig"] = [{
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": min(max_attempts, 5),  # gRPC caps attempts at 5
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
        if not retry_agent_runs:
            # A method's own entry wins over its service's: no retryPolicy, no retries.
            config["methodConfig"].append({
                "name": [{"service": SERVICE, "method": method} for method in AGENT_RUN_METHODS],
            })
    return json.dumps(config)


# --- sync ----------------------------------------------------------------------------------


class _SyncCallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _SyncDefaults(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the default deadline and the API key to calls that do not set their own."""

    def __init__(self, timeout: float | None, metadata: Metadata) -> None:
        self._timeout = timeout
        self._metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _SyncCallDetails(  # type: ignore[return-value]
            details.method,
            self._timeout if details.timeout is None else details.timeout,
            _merged(details.metadata, self._metadata),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)


def sync_channel(config: ChannelConfig) -> grpc.Channel:
    credentials = config.channel_credentials()
    options = config.channel_options()
    channel = (
        grpc.secure_channel(config.address, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(config.address, options=options)
    )
    return grpc.intercept_channel(channel, _SyncDefaults(config.timeout, config.metadata))


# --- asyncio -------------------------------------------------------------------------------


class _AioDefaults:
    def __init__(self, timeout: float | None, metadata: Metadata) -> None:
        self._timeout = timeout
        self._metadata = metadata

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details._replace(  # type: ignore[attr-defined, no-any-return]
            timeout=self._timeout if details.timeout is None else details.timeout,
            metadata=grpc.aio.Metadata(*_merged(details.metadata, self._metadata)),
        )


class _AioUnaryUnary(_AioDefaults, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStream(_AioDefaults, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnary(_AioDefaults, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStream(_AioDefaults, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self._details(client_call_details), request_iterator)


def aio_channel(config: ChannelConfig) -> grpc.aio.Channel:
    """Must be called with an event loop running (grpc.aio binds the channel to it)."""
    interceptors = [
        kind(config.timeout, config.metadata)
        for kind in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
    ]
    credentials = config.channel_credentials()
    options = config.channel_options()
    if credentials is not None:
        return grpc.aio.secure_channel(
            config.address, credentials, options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(config.address, options=options, interceptors=interceptors)


def _merged(
    existing: Sequence[tuple[str, str | bytes]] | None, extra: Metadata
) -> list[tuple[str, str | bytes]]:
    """The call's own metadata wins: an explicit `authorization` is kept, not doubled."""
    items = list(existing or ())
    keys = {key for key, _ in items}
    return items + [(key, value) for key, value in extra if key not in keys]
