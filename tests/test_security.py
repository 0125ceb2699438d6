"""API keys, rate limits, request size limits, TLS and mutual TLS, through real channels."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import itertools
import logging
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agentloop import tenants
from agentloop.config import SettingsError
from agentloop.rpc.auth import ApiKeys, RefusalLog, TokenBuckets
from agentloop.rpc.edge import Edge
from agentloop.rpc.transport import RequestBytes
from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from fake_ollama import FakeOllama, Script, wait_until
from helpers import TOKENS, bad_fields, client_stub, gateway_settings, rich_details, running_gateway

KEY_FILE_TEXT = "# team A\nkey-from-file-1\n\n  key-from-file-2  # rotated 2026-11\n"


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def expect_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            while await call.read() is not grpc.aio.EOF:
                pass
        else:
            await call
    return caught.value


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text(KEY_FILE_TEXT)
    return path


@pytest.fixture
async def secured(fake_ollama: FakeOllama, key_file: Path):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, api_keys="env-key",
                                api_keys_file=str(key_file))
    async with running_gateway(settings) as running:
        yield running


# --- API keys -----------------------------------------------------------------------------

async def test_calls_without_a_valid_key_are_unauthenticated(secured, fake_ollama, caplog):
    caplog.set_level(logging.INFO)
    async with client_stub(secured.address) as stub:
        for metadata in ((), bearer("wrong-key"), (("authorization", "env-key"),),
                         bearer("key-from-file-1 # team A")):
            for call in (stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=metadata,
                                       timeout=5),
                         stub.StreamGenerate(pb.StreamGenerateRequest(prompt="hi"),
                                             metadata=metadata, timeout=5),
                         stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=5)):
                error = await expect_error(call)
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                assert rich_details(error)["ErrorInfo"].reason == "UNAUTHENTICATED"
    assert fake_ollama.generation_requests == []
    assert "wrong-key" not in caplog.text, "a presented key must never be logged"
    # Twelve refusals, one line: a flood of made-up keys must not flood the log.
    assert caplog.text.count("refused /agentloop.v1.AgentLoopService/") == 1, caplog.text


def test_the_refusal_log_says_how_many_calls_it_did_not_log(caplog):
    now = [0.0]
    refusals = RefusalLog(interval=10.0, clock=lambda: now[0])
    for _ in range(5):
        refusals.warn("/agentloop.v1.AgentLoopService/Generate", "ipv4:10.0.0.1:1", "invalid")
    now[0] = 10.0
    refusals.warn("/agentloop.v1.AgentLoopService/Generate", "ipv4:10.0.0.1:1", "missing")
    lines = [r.getMessage() for r in caplog.records if r.name == "agentloop.rpc.auth"]
    assert len(lines) == 2 and lines[1].endswith("(4 more refused since the last line)"), lines


@pytest.mark.parametrize("key", ["env-key", "key-from-file-1", "key-from-file-2"])
async def test_keys_from_the_setting_and_the_file_are_accepted(secured, key):
    async with client_stub(secured.address) as stub:
        reply = await stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=bearer(key),
                                    timeout=5)
        assert reply.text == "".join(TOKENS)
        lower = (("authorization", f"bearer {key}"),)
        replies = [r async for r in stub.StreamGenerate(
            pb.StreamGenerateRequest(prompt="hi"), metadata=lower, timeout=5)]
        assert "".join(r.text for r in replies) == "".join(TOKENS)


async def test_health_and_reflection_need_no_key(secured):
    async with grpc.aio.insecure_channel(secured.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="readiness"), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        services = [s.name async for reply in reflection
                    for s in reply.list_services_response.service]
        assert "agentloop.v1.AgentLoopService" in services


async def test_exemptions_are_configurable(fake_ollama):
    settings = gateway_settings(ollama_url=fake_ollama.url, api_keys="k", auth_exempt="")
    async with running_gateway(settings) as running, \
            grpc.aio.insecure_channel(running.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        error = await expect_error(health.Check(health_pb2.HealthCheckRequest(), timeout=5))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = await health.Check(health_pb2.HealthCheckRequest(), metadata=bearer("k"),
                                   timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_keys_are_kept_only_as_sha256_digests():
    keys = ApiKeys(["sesame", "other"])
    held = repr(vars(keys)) + repr(vars(keys._file)) + repr(keys._digests)
    assert "sesame" not in held and b"sesame" not in b"".join(keys._digests)
    assert keys.accepts("sesame") and keys.accepts("other")
    assert not keys.accepts("sesam") and not keys.accepts("") and not ApiKeys([]).accepts("")


async def test_a_key_file_without_keys_stops_the_start(tmp_path: Path):
    empty = tmp_path / "keys"
    empty.write_text("# nobody yet\n\n")
    with pytest.raises(SettingsError, match="AGENTLOOP_API_KEYS_FILE"):
        async with running_gateway(gateway_settings(api_keys_file=str(empty))):
            pass


def slow_reads(monkeypatch: pytest.MonkeyPatch, which: int = 1
               ) -> tuple[threading.Event, threading.Event]:
    """Make the keys file's `which`-th reading wait after it has read the file, until the
    test says go: (reading, go)."""
    read = tenants.read_keys_file
    reading, go = threading.Event(), threading.Event()
    count = itertools.count(1)

    def read_slowly(*args: Any) -> Any:
        keys = read(*args)
        if next(count) == which:
            reading.set()
            assert go.wait(30), "the test never let the reading go on"
        return keys

    monkeypatch.setattr(tenants, "read_keys_file", read_slowly)
    return reading, go


def test_an_older_reading_of_the_keys_file_never_lands_over_a_newer_one(tmp_path, monkeypatch):
    # Before: the watch thread's slow reading of the old file landed after SIGHUP's reading
    # of the new one, whose stamp was already recorded: a removed key stayed valid until
    # the file changed again.
    path = tmp_path / "keys"
    path.write_text("kept-key\nrevoked-key\n")
    keys = ApiKeys([], str(path))
    reading, go = slow_reads(monkeypatch)
    watch = threading.Thread(target=keys.reload)
    watch.start()
    try:
        assert reading.wait(30)  # the watch has read the old file, not applied it yet
        path.write_text("kept-key\n")
        keys.reload()  # SIGHUP's, meanwhile
    finally:
        go.set()
        watch.join(30)
    assert keys.accepts("kept-key") and not keys.accepts("revoked-key")
    assert not keys.changed()


async def test_a_keys_reload_reads_the_file_off_the_event_loop(fake_ollama, key_file,
                                                               monkeypatch):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, api_keys_file=str(key_file),
                                api_keys_reload_interval=0)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        reading, go = slow_reads(monkeypatch)
        key_file.write_text("new-key\n")
        reload = asyncio.ensure_future(running.reload_keys())
        try:
            assert await asyncio.to_thread(reading.wait, 30)
            # The reading waits; the event loop serves on, with the keys in force.
            await stub.ListModels(pb.ListModelsRequest(), metadata=bearer("key-from-file-1"),
                                  timeout=5)
        finally:
            go.set()
        assert await reload
        await stub.ListModels(pb.ListModelsRequest(), metadata=bearer("new-key"), timeout=5)
        error = await expect_error(stub.ListModels(pb.ListModelsRequest(),
                                                   metadata=bearer("key-from-file-1"), timeout=5))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(("overrides", "named"), [
    ({"api_keys_file": "/no/such/file"}, "AGENTLOOP_API_KEYS_FILE"),
    ({"tls_cert": "/no/such/cert"}, "AGENTLOOP_TLS_CERT"),
    ({"api_keys": "has space"}, "AGENTLOOP_API_KEYS"),
    ({"rate_limit": -1.0}, "AGENTLOOP_RATE_LIMIT"),
    ({"rate_burst": 0}, "AGENTLOOP_RATE_BURST"),
    ({"circuit_failure_threshold": 0}, "AGENTLOOP_CIRCUIT_FAILURE_THRESHOLD"),
    ({"circuit_reset_timeout": 0.0}, "AGENTLOOP_CIRCUIT_RESET_TIMEOUT"),
    ({"retry_backoff": 1.0, "retry_backoff_max": 0.5}, "AGENTLOOP_RETRY_BACKOFF_MAX"),
    ({"cache_ttl": 0.0}, "AGENTLOOP_CACHE_TTL"),
    ({"max_message_bytes": 10}, "AGENTLOOP_MAX_MESSAGE_BYTES"),
])
def test_bad_security_and_resilience_settings_name_the_variable(overrides, named):
    with pytest.raises(SettingsError, match=named):
        gateway_settings(**overrides)


# --- rate limits --------------------------------------------------------------------------

async def test_a_client_over_its_rate_gets_resource_exhausted_with_retry_info(fake_ollama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, rate_limit=0.5, rate_burst=3)
    async with running_gateway(settings) as running:
        # Peers are told apart by address, not by connection: two channels, one bucket.
        async with client_stub(running.address) as one, client_stub(running.address) as two:
            for stub in (one, two, one):
                await stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
            error = await expect_error(two.Generate(pb.GenerateRequest(prompt="hi"), timeout=5))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = rich_details(error)
        assert details["ErrorInfo"].metadata["limit"] == "rate"
        assert 0 < details["RetryInfo"].retry_delay.ToNanoseconds() <= 2e9
        assert len(fake_ollama.generation_requests) == 3
        # Health probes are not rate limited.
        async with grpc.aio.insecure_channel(running.address) as channel:
            for _ in range(5):
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5)


async def test_with_keys_each_key_has_its_own_bucket(fake_ollama):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, api_keys="alpha,beta",
                                rate_limit=0.5, rate_burst=1)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        await stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=bearer("alpha"), timeout=5)
        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="hi"),
                                                 metadata=bearer("alpha"), timeout=5))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=bearer("beta"), timeout=5)
        # An invented key is refused before it could earn a bucket of its own.
        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="hi"),
                                                 metadata=bearer("gamma"), timeout=5))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_token_buckets_refill_at_the_rate_and_say_when():
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=2, clock=lambda: now[0])
    assert buckets.take("a") == 0.0 and buckets.take("a") == 0.0
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0, "clients do not share a bucket"
    now[0] = 0.25
    assert buckets.take("a") == pytest.approx(0.25)
    now[0] = 0.5
    assert buckets.take("a") == 0.0
    now[0] = 100.0
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]


# --- request size limits ------------------------------------------------------------------

async def test_size_limits(fake_ollama):
    settings = gateway_settings(ollama_url=fake_ollama.url, max_message_bytes=64 * 1024,
                                max_prompt_bytes=1000, max_messages=3, max_image_bytes=2000)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="x" * 100_000),
                                                 timeout=5))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, "grpc's receive limit"
        error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="x" * 1001),
                                                 timeout=5))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(error) == {"prompt"}
        user = pb.Message(role=pb.ROLE_USER, content="hi")
        error = await expect_error(stub.Generate(pb.GenerateRequest(messages=[user] * 4),
                                                 timeout=5))
        assert bad_fields(error) == {"messages"}
        error = await expect_error(stub.Generate(pb.GenerateRequest(messages=[
            pb.Message(role=pb.ROLE_USER, content="look", images=[b"i" * 1500, b"j" * 501])]),
            timeout=5))
        assert bad_fields(error) == {"messages.images"}
        error = await expect_error(stub.Generate(pb.GenerateRequest(
            messages=[pb.Message(role=pb.ROLE_USER, content="y" * 600)] * 2), timeout=5))
        assert bad_fields(error) == {"messages"}
        # Right at the limits is fine.
        reply = await stub.Generate(pb.GenerateRequest(messages=[
            pb.Message(role=pb.ROLE_USER, content="x" * 300, images=[b"i" * 2000])] * 1),
            timeout=5)
        assert reply.text
    assert len(fake_ollama.generation_requests) == 1


# --- TLS and mutual TLS -------------------------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
                 server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class Pki:
    """A throwaway CA with a server and a client certificate, plus a stranger's client."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        ca_key, rogue_key = ec.generate_private_key(ec.SECP256R1()), \
            ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("test CA", ca_key, "test CA", ca_key, ca=True)
        rogue = _certificate("rogue CA", rogue_key, "rogue CA", rogue_key, ca=True)
        self.ca = self._write("ca.pem", _pem(ca))
        for name, issuer, issuer_key, server in (("server", "test CA", ca_key, True),
                                                 ("client", "test CA", ca_key, False),
                                                 ("stranger", "rogue CA", rogue_key, False)):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _certificate(name, key, issuer, issuer_key, server=server)
            chain = _pem(cert) + (_pem(rogue) if issuer == "rogue CA" else b"")
            self._write(f"{name}.pem", chain)
            self._write(f"{name}.key", key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))

    def _write(self, name: str, data: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(data)
        return path

    def read(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def credentials(self, client: str | None = None) -> grpc.ChannelCredentials:
        if client is None:
            return grpc.ssl_channel_credentials(root_certificates=self.read("ca.pem"))
        return grpc.ssl_channel_credentials(
            root_certificates=self.read("ca.pem"), private_key=self.read(f"{client}.key"),
            certificate_chain=self.read(f"{client}.pem"))


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


async def generate_over(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    channel = (grpc.aio.secure_channel(address, credentials) if credentials is not None
               else grpc.aio.insecure_channel(address))
    async with channel:
        reply = await pb_grpc.AgentLoopServiceStub(channel).Generate(
            pb.GenerateRequest(prompt="hi"), timeout=3)
    return reply.text


async def test_tls_serves_only_tls_clients(fake_ollama, pki):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(ollama_url=fake_ollama.url, tls_cert=str(pki.directory /
                                "server.pem"), tls_key=str(pki.directory / "server.key"))
    async with running_gateway(settings) as running:
        assert await generate_over(running.address, pki.credentials()) == "".join(TOKENS)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate_over(running.address, None)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_wants_a_client_certificate_from_the_ca(fake_ollama, pki):
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(
        ollama_url=fake_ollama.url, tls_cert=str(pki.directory / "server.pem"),
        tls_key=str(pki.directory / "server.key"), tls_client_ca=str(pki.ca))
    async with running_gateway(settings) as running:
        assert await generate_over(running.address, pki.credentials("client")) == \
            "".join(TOKENS)
        for credentials in (pki.credentials(), pki.credentials("stranger")):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await generate_over(running.address, credentials)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(fake_ollama.generation_requests) == 1


def test_tls_settings_go_together(pki):
    with pytest.raises(SettingsError, match="AGENTLOOP_TLS_KEY"):
        gateway_settings(tls_cert=str(pki.directory / "server.pem"))
    with pytest.raises(SettingsError, match="AGENTLOOP_TLS_CLIENT_CA"):
        gateway_settings(tls_client_ca=str(pki.ca))


async def test_a_call_without_a_valid_key_is_refused_before_its_request_is_parsed():
    # Millions of messages in a request cost seconds to parse: a caller without a key
    # must not get that far. The edge decides before it reads a byte of the request.
    parsed: list[bytes] = []

    def parse(data: bytes) -> pb.GenerateRequest:
        parsed.append(data)
        return pb.GenerateRequest.FromString(data)

    async def generate(request: pb.GenerateRequest, _context: Any) -> pb.GenerateResponse:
        return pb.GenerateResponse(text=request.prompt)

    server = grpc.aio.server(interceptors=[Edge(RequestBytes(1 << 20), ApiKeys(["right-key"]))])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "agentloop.v1.AgentLoopService", {"Generate": grpc.unary_unary_rpc_method_handler(
            generate, request_deserializer=parse,
            response_serializer=pb.GenerateResponse.SerializeToString)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with client_stub(f"127.0.0.1:{port}") as stub:
            error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="x"),
                                                     metadata=bearer("wrong-key"), timeout=5))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED and parsed == []
            reply = await stub.Generate(pb.GenerateRequest(prompt="x"),
                                        metadata=bearer("right-key"), timeout=5)
        assert reply.text == "x" and len(parsed) == 1
    finally:
        await server.stop(None)


# --- the edge gives back what it took ------------------------------------------------------

EDGE_BUDGET = 1 << 20


def generate_of_size(size: int) -> pb.GenerateRequest:
    """A GenerateRequest whose serialized form is exactly `size` bytes (size >= 3)."""
    for prompt_chars in range(size - 2, 0, -1):
        request = pb.GenerateRequest(prompt="x" * prompt_chars)
        if request.ByteSize() == size:
            return request
    raise AssertionError(size)


def sizes_summing_to(total: int, count: int) -> list[int]:
    """`count` sizes from tiny to large, summing to `total` exactly."""
    sizes = [3 + (index * index * 97) % 20_000 for index in range(count - 1)]
    return [*sizes, total - sum(sizes)]


async def health_status(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


async def test_refused_calls_of_every_kind_give_their_bytes_back(fake_ollama):
    # Before: a call refused by the rate limit, or with a valid key from a locked-out
    # address, kept its request bytes in the budget for good. Once they filled it, every
    # call, probes included, was RESOURCE_EXHAUSTED until a restart.
    fake_ollama.default_script = Script(tokens=TOKENS)
    settings = gateway_settings(
        ollama_url=fake_ollama.url, api_keys="alpha,beta,gamma", rate_limit=0.01,
        rate_burst=1, refusal_burst=2, refusal_rate=10.0, auth_exempt="grpc.health.v1.Health",
        max_request_bytes_in_flight=EDGE_BUDGET, max_prompt_bytes=EDGE_BUDGET,
        max_message_bytes=EDGE_BUDGET + 1024)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        await stub.Generate(generate_of_size(64), metadata=bearer("alpha"), timeout=5)
        # Rate-limited (alpha's bucket is empty): half the budget, in calls of every size.
        for size in sizes_summing_to(EDGE_BUDGET // 2, 12):
            error = await expect_error(stub.Generate(generate_of_size(size),
                                                     metadata=bearer("alpha"), timeout=5))
            assert rich_details(error)["ErrorInfo"].metadata["limit"] == "rate"
        streamed = stub.StreamGenerate(pb.StreamGenerateRequest(prompt="y" * 5000),
                                       metadata=bearer("alpha"), timeout=5)
        assert (await expect_error(streamed)).code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # Bad keys until the address is locked out, then valid keys from it: the rest.
        for size in (3, EDGE_BUDGET):
            error = await expect_error(stub.Generate(generate_of_size(size),
                                                     metadata=bearer("guess"), timeout=5))
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        for size in sizes_summing_to(EDGE_BUDGET - EDGE_BUDGET // 2, 9):
            error = await expect_error(stub.Generate(generate_of_size(size),
                                                     metadata=bearer("beta"), timeout=5))
            assert rich_details(error)["ErrorInfo"].metadata["limit"] == "refusals"
        # Past the message cap: gRPC refuses it before any handler.
        error = await expect_error(stub.Generate(generate_of_size(EDGE_BUDGET + 2048),
                                                 metadata=bearer("gamma"), timeout=5))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        for service in ("readiness", "liveness"):
            assert await health_status(running.address, service) == \
                health_pb2.HealthCheckResponse.SERVING
        # Once the lock-out is over, a call as large as the whole budget gets through.
        codes: list[grpc.StatusCode] = []

        async def served() -> bool:
            try:
                await stub.Generate(generate_of_size(EDGE_BUDGET), metadata=bearer("gamma"),
                                    timeout=5)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
                assert rich_details(exc)["ErrorInfo"].metadata["limit"] == "refusals", codes
                return False
            return True

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not await served():
            assert loop.time() < deadline, codes
    assert len(fake_ollama.generation_requests) == 2


async def test_probes_are_never_refused_by_the_byte_budget_but_are_small(fake_ollama):
    fake_ollama.default_script = Script(hang_before_headers=True)
    settings = gateway_settings(ollama_url=fake_ollama.url, max_prompt_bytes=EDGE_BUDGET,
                                max_request_bytes_in_flight=EDGE_BUDGET)
    async with running_gateway(settings) as running, client_stub(running.address) as stub:
        held = stub.StreamGenerate(generate_of_size(EDGE_BUDGET - 5), timeout=20)
        await wait_until(lambda: len(fake_ollama.generation_requests) == 1, timeout=10)
        error = await expect_error(stub.Generate(generate_of_size(16), timeout=5))
        assert rich_details(error)["ErrorInfo"].metadata["limit"] == "request_bytes"
        # The budget is full to 5 bytes; a probe's request is larger and still answered.
        for service in ("readiness", "liveness"):
            assert await health_status(running.address, service) == \
                health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(running.address) as channel:
            error = await expect_error(health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="x" * 5000), timeout=5))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rich_details(error)["ErrorInfo"].metadata["limit"] == "probe_message_bytes"
        held.cancel()


# --- the metadata the gateway reads fails closed ----------------------------------------------

@pytest.mark.parametrize(("metadata", "field"), [
    ((("x-agentloop-priority", "critical"), ("x-agentloop-priority", "sheddable")),
     "x-agentloop-priority"),
    ((("x-agentloop-priority", "high"),), "x-agentloop-priority"),
    ((("x-agentloop-cache-key", "a"), ("x-agentloop-cache-key", "b")), "x-agentloop-cache-key"),
    ((("x-agentloop-cache-key", "k" * 129),), "x-agentloop-cache-key"),
    ((("x-agentloop-session", "a"), ("x-agentloop-session", "b")), "x-agentloop-session"),
])
async def test_repeated_or_unknown_metadata_values_are_refused_naming_the_header(
        stub, fake_ollama, metadata, field):
    error = await expect_error(stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=metadata,
                                             timeout=5))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and bad_fields(error) == {field}
    assert fake_ollama.generation_requests == []
