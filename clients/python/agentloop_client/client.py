"""The synchronous client.

    with AgentLoopClient("127.0.0.1:50051") as client:
        for text in client.stream_text("Once upon a time", options={"max_tokens": 64}):
            print(text, end="", flush=True)

Every method raises an `agentloop_client.errors.AgentLoopError` subclass on failure. The
generated stub is `client.stub`; calls made through it get the same default deadline and
API key.
"""

from __future__ import annotations

import queue
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing
from typing import Any

import grpc

from agentloop_client._proto.agentloop.v1 import agentloop_pb2 as pb
from agentloop_client._proto.agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from agentloop_client.channel import (
    DEFAULT_ADDRESS,
    ChannelConfig,
    session_metadata,
    sync_channel,
)
from agentloop_client.errors import error_from_rpc
from agentloop_client.health import check_method, check_request, status_name
from agentloop_client.requests import (
    ClientTool,
    FormatLike,
    MessageLike,
    OptionsLike,
    ToolChoiceLike,
    ToolLike,
    agent_fields,
    count_tokens_request,
    embed_request,
    generation_fields,
    start_agent_run,
    tool_call_target,
    tool_result,
)


class AgentLoopClient:
    """A channel to one gateway (or a balanced set of replicas) and typed calls over it."""

    def __init__(self, address: str = DEFAULT_ADDRESS, **config: Any) -> None:
        """`config` takes the fields of `ChannelConfig`: timeout, api_key, tls, ..."""
        self.config = ChannelConfig(address=address, **config)
        self.channel = sync_channel(self.config)
        self.stub = pb_grpc.AgentLoopServiceStub(self.channel)
        self._health_check = check_method(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AgentLoopClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[MessageLike] = (),
        system: str = "",
        model: str = "",
        options: OptionsLike | None = None,
        format: FormatLike = None,
        tools: Sequence[ToolLike] = (),
        tool_choice: ToolChoiceLike = None,
        timeout: float | None = None,
        session: str | None = None,
    ) -> pb.GenerateResponse:
        request = pb.GenerateRequest(
            **generation_fields(prompt, messages, system, model, options, format, tools,
                              tool_choice))
        try:
            return self.stub.Generate(request, timeout=timeout, metadata=session_metadata(session))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def stream_generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[MessageLike] = (),
        system: str = "",
        model: str = "",
        options: OptionsLike | None = None,
        format: FormatLike = None,
        tools: Sequence[ToolLike] = (),
        tool_choice: ToolChoiceLike = None,
        timeout: float | None = None,
        session: str | None = None,
    ) -> Generator[pb.StreamGenerateResponse, None, None]:
        """The stream's messages; leaving the loop early cancels the call."""
        request = pb.StreamGenerateRequest(
            **generation_fields(prompt, messages, system, model, options, format, tools,
                              tool_choice))
        call = self.stub.StreamGenerate(
            request, timeout=timeout, metadata=session_metadata(session))
        try:
            yield from call
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    def stream_text(self, prompt: str | None = None, **kwargs: Any) -> Generator[str, None, None]:
        """Only the text deltas of `stream_generate`, as they arrive."""
        with closing(self.stream_generate(prompt, **kwargs)) as responses:
            for response in responses:
                if response.text:
                    yield response.text

    def run_agent(
        self,
        goal: str,
        *,
        system: str = "",
        messages: Sequence[MessageLike] = (),
        tools: Sequence[str] = (),
        max_steps: int = 0,
        options: OptionsLike | None = None,
        model: str = "",
        timeout: float | None = None,
        session: str | None = None,
    ) -> pb.RunAgentResponse:
        request = pb.RunAgentRequest(
            **agent_fields(goal, system, messages, tools, max_steps, options, model))
        try:
            return self.stub.RunAgent(request, timeout=timeout, metadata=session_metadata(session))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def stream_run_agent(
        self,
        goal: str,
        *,
        client_tools: Sequence[ClientTool] = (),
        system: str = "",
        messages: Sequence[MessageLike] = (),
        tools: Sequence[str] = (),
        max_steps: int = 0,
        options: OptionsLike | None = None,
        model: str = "",
        timeout: float | None = None,
        session: str | None = None,
    ) -> Generator[pb.StreamRunAgentResponse, None, None]:
        """The run's events. Calls to `client_tools` are run here and answered for you."""
        by_name = {tool.name: tool for tool in client_tools}
        outbox: queue.SimpleQueue[pb.StreamRunAgentRequest | None] = queue.SimpleQueue()
        outbox.put(start_agent_run(
            agent_fields(goal, system, messages, tools, max_steps, options, model),
            client_tools))

        def requests() -> Iterator[pb.StreamRunAgentRequest]:
            while (item := outbox.get()) is not None:
                yield item

        call = self.stub.StreamRunAgent(
            requests(), timeout=timeout, metadata=session_metadata(session))
        try:
            for event in call:
                yield event
                if event.HasField("tool_call") and event.tool_call.client_tool:
                    outbox.put(_run_tool(by_name, event.tool_call))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            outbox.put(None)  # ends the request stream (and its sending thread)
            call.cancel()

    def embed(
        self,
        texts: str | Sequence[str],
        *,
        model: str = "",
        normalize: bool = True,
        truncate: bool = False,
        dimensions: int = 0,
        timeout: float | None = None,
        session: str | None = None,
    ) -> pb.EmbedResponse:
        """One vector per text, in order: `[list(e.values) for e in reply.embeddings]`.

        A text longer than the model's context is refused (InvalidArgument naming
        `texts[i]`) unless `truncate`; `dimensions` asks a Matryoshka model for shorter
        vectors."""
        request = embed_request(texts, model, normalize, truncate, dimensions)
        try:
            return self.stub.Embed(request, timeout=timeout,
                                   metadata=session_metadata(session))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def count_tokens(
        self,
        texts: str | Sequence[str] = (),
        *,
        messages: Sequence[MessageLike] = (),
        system: str = "",
        model: str = "",
        timeout: float | None = None,
        session: str | None = None,
    ) -> pb.CountTokensResponse:
        """Tokens the model would see: one count per text, or one for a chat (`messages`
        and `system` as `generate` takes them), with the model's `context_length`."""
        request = count_tokens_request(texts, messages, system, model)
        try:
            return self.stub.CountTokens(request, timeout=timeout,
                                         metadata=session_metadata(session))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def list_models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        try:
            return self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def list_tools(self, *, timeout: float | None = None) -> pb.ListToolsResponse:
        """The server tools a run may name in `tools` (built-in and MCP), with their schemas."""
        try:
            return self.stub.ListTools(pb.ListToolsRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The serving status name ("SERVING", "NOT_SERVING", ...) of a health service name."""
        try:
            reply = self._health_check(check_request(service), timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return status_name(reply)


def _run_tool(tools: dict[str, ClientTool], call: pb.AgentToolCall) -> pb.StreamRunAgentRequest:
    try:
        tool, arguments = tool_call_target(tools, call)
        return tool_result(call.call_id, tool.run(arguments))
    except Exception as exc:  # the model sees the tool's failure and may try otherwise
        return tool_result(call.call_id, error=exc)
