"""The asyncio client (grpc.aio): the same calls as `AgentLoopClient`, awaited.

    async with AsyncAgentLoopClient("127.0.0.1:50051") as client:
        async for text in client.stream_text("Once upon a time"):
            print(text, end="", flush=True)

Create it inside the event loop that uses it. Leaving an `async for` early cancels the call
(`aclosing` makes that immediate rather than at garbage collection).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

import grpc

from agentloop_client._proto.agentloop.v1 import agentloop_pb2 as pb
from agentloop_client._proto.agentloop.v1 import agentloop_pb2_grpc as pb_grpc
from agentloop_client.channel import (
    DEFAULT_ADDRESS,
    ChannelConfig,
    aio_channel,
    session_metadata,
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
    background_run_request,
    count_tokens_request,
    embed_request,
    generation_fields,
    start_agent_run,
    tool_call_target,
    tool_result,
)


class AsyncAgentLoopClient:
    """A grpc.aio channel to the gateway and typed calls over it."""

    def __init__(self, address: str = DEFAULT_ADDRESS, **config: Any) -> None:
        """`config` takes the fields of `ChannelConfig`: timeout, api_key, tls, ..."""
        self.config = ChannelConfig(address=address, **config)
        self.channel = aio_channel(self.config)
        self.stub = pb_grpc.AgentLoopServiceStub(self.channel)
        self._health_check = check_method(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncAgentLoopClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def generate(
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
            return await self.stub.Generate(
                request, timeout=timeout, metadata=session_metadata(session))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def stream_generate(
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
    ) -> AsyncGenerator[pb.StreamGenerateResponse, None]:
        request = pb.StreamGenerateRequest(
            **generation_fields(prompt, messages, system, model, options, format, tools,
                              tool_choice))
        call = self.stub.StreamGenerate(
            request, timeout=timeout, metadata=session_metadata(session))
        try:
            async for response in call:
                yield response
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    async def stream_text(
        self, prompt: str | None = None, **kwargs: Any
    ) -> AsyncGenerator[str, None]:
        """Only the text deltas of `stream_generate`, as they arrive."""
        async with aclosing(self.stream_generate(prompt, **kwargs)) as responses:
            async for response in responses:
                if response.text:
                    yield response.text

    async def run_agent(
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
            return await self.stub.RunAgent(
                request, timeout=timeout, metadata=session_metadata(session))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def stream_run_agent(
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
    ) -> AsyncGenerator[pb.StreamRunAgentResponse, None]:
        """The run's events. Calls to `client_tools` are run here and answered for you."""
        by_name = {tool.name: tool for tool in client_tools}
        call = self.stub.StreamRunAgent(timeout=timeout, metadata=session_metadata(session))
        try:
            await call.write(start_agent_run(
                agent_fields(goal, system, messages, tools, max_steps, options, model),
                client_tools))
            async for event in call:
                yield event
                if event.HasField("tool_call") and event.tool_call.client_tool:
                    await call.write(await _run_tool(by_name, event.tool_call))
                elif event.HasField("finished"):
                    await call.done_writing()
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    # --- background runs ---

    async def start_agent_run(
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
        run_timeout: float | None = None,
        webhook_url: str = "",
        timeout: float | None = None,
        session: str | None = None,
    ) -> pb.AgentRun:
        """Start a background run; returns at once (its `id` names it from then on). The
        run goes on without this client; calls to `client_tools` wait for
        `submit_tool_result` (see `run_client_tools`)."""
        request = background_run_request(
            agent_fields(goal, system, messages, tools, max_steps, options, model),
            client_tools, run_timeout, webhook_url)
        reply = await self._call(self.stub.StartAgentRun, request, timeout, session)
        return reply.run

    async def get_agent_run(self, run_id: str, *, timeout: float | None = None
                            ) -> pb.AgentRun:
        reply = await self._call(self.stub.GetAgentRun, pb.GetAgentRunRequest(run_id=run_id),
                                 timeout)
        return reply.run

    async def list_agent_runs(self, statuses: Sequence[int] = (), *, page_size: int = 0,
                              timeout: float | None = None
                              ) -> AsyncGenerator[pb.AgentRun, None]:
        """The tenant's runs, newest first, page after page (`statuses`: AgentRunStatus
        values; empty = all)."""
        token = ""
        while True:
            page = await self._call(self.stub.ListAgentRuns, pb.ListAgentRunsRequest(
                page_size=page_size, page_token=token, statuses=statuses), timeout)
            for run in page.runs:
                yield run
            token = page.next_page_token
            if not token:
                return

    async def cancel_agent_run(self, run_id: str, *, timeout: float | None = None
                               ) -> pb.AgentRun:
        """Cancel a run (idempotent); the run as it is after the cancel."""
        reply = await self._call(self.stub.CancelAgentRun,
                                 pb.CancelAgentRunRequest(run_id=run_id), timeout)
        return reply.run

    async def submit_tool_result(self, run_id: str, call_id: str, output: Any = None,
                                 error: BaseException | None = None, *,
                                 timeout: float | None = None) -> pb.AgentRun:
        """Answer the client tool call a background run waits for."""
        result = tool_result(call_id, output, error).tool_result
        reply = await self._call(self.stub.SubmitToolResult, pb.SubmitToolResultRequest(
            run_id=run_id, tool_result=result), timeout)
        return reply.run

    async def watch_agent_run(
        self, run_id: str, after_sequence: int = 0, *, resume: bool = True,
        retry_delay: float = 0.5, timeout: float | None = None,
    ) -> AsyncGenerator[pb.WatchAgentRunResponse, None]:
        """The run's events after `after_sequence`, then the new ones, until it ends. With
        `resume`, a dropped stream (UNAVAILABLE: a replica going away, a broken connection;
        or a stream that ended before the run did) is opened again after the last event
        received: nothing is missed or repeated."""
        seen = after_sequence
        while True:
            call = self.stub.WatchAgentRun(pb.WatchAgentRunRequest(
                run_id=run_id, after_sequence=seen), timeout=timeout)
            try:
                async for event in call:
                    seen = event.sequence
                    yield event
                    if event.HasField("run_ended"):
                        return
                if not resume:
                    return
            except grpc.RpcError as exc:
                if not resume or exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise error_from_rpc(exc) from None
            finally:
                call.cancel()
            await asyncio.sleep(retry_delay)

    async def _call(self, method: Any, request: Any, timeout: float | None,
                    session: str | None = None) -> Any:
        try:
            return await method(request, timeout=timeout, metadata=session_metadata(session))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def embed(
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
            return await self.stub.Embed(request, timeout=timeout,
                                   metadata=session_metadata(session))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def count_tokens(
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
            return await self.stub.CountTokens(request, timeout=timeout,
                                         metadata=session_metadata(session))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def list_models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        try:
            return await self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def list_tools(self, *, timeout: float | None = None) -> pb.ListToolsResponse:
        """The server tools a run may name in `tools` (built-in and MCP), with their schemas."""
        try:
            return await self.stub.ListTools(pb.ListToolsRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The serving status name ("SERVING", "NOT_SERVING", ...) of a health service name."""
        try:
            reply = await self._health_check(check_request(service), timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return status_name(reply)


async def _run_tool(tools: dict[str, ClientTool], call: pb.AgentToolCall
                    ) -> pb.StreamRunAgentRequest:
    try:
        tool, arguments = tool_call_target(tools, call)
        output = tool.run(arguments)
        if inspect.isawaitable(output):
            output = await output
        return tool_result(call.call_id, output)
    except Exception as exc:  # the model sees the tool's failure and may try otherwise
        return tool_result(call.call_id, error=exc)
