"""The AgentLoopService servicer: each method checks, calls a service, translates.

Errors are raised, not handled, here: `rpc.interceptors.ErrorInterceptor` turns them
into statuses.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any, TypeVar

import grpc

from agentloop.config import Settings
from agentloop.domain import CallContext, ToolCallDelta
from agentloop.errors import (
    AgentLoopError,
    FailedPrecondition,
    FirstMessageTimeout,
    InvalidArgument,
    Unimplemented,
)
from agentloop.rpc.agent_requests import (
    ToolResultReader,
    client_tool_result,
    run_agent_request,
    start_agent_run,
    start_background_run,
)
from agentloop.rpc.agent_responses import agent_event_pb, list_tools_response, run_agent_response
from agentloop.rpc.coalesce import coalesced
from agentloop.rpc.embedding_requests import embedding_request, token_count_request
from agentloop.rpc.requests import call_context, deadline_from, generation_request
from agentloop.rpc.responses import (
    count_tokens_response,
    embed_response,
    generate_response,
    model_pb,
    stream_delta,
    stream_end,
    stream_tool_call_delta,
    upstream_metadata,
)
from agentloop.rpc.run_responses import (
    STATUSES_OF_PB,
    run_event_pb,
    run_pb,
    stream_event_pb,
)
from agentloop.services.agent import (
    AgentRun,
    AgentService,
    answer_delta_key,
    join_answer_deltas,
)
from agentloop.services.embeddings import EmbeddingService
from agentloop.services.generation import GenerationService
from agentloop.services.runs import RunEnded, RunManager
from agentloop.v1 import agentloop_pb2 as pb
from agentloop.v1 import agentloop_pb2_grpc as pb_grpc

T = TypeVar("T")
#: The initial metadata naming the background run a StreamRunAgent with
#: continue_on_disconnect follows.
RUN_ID_HEADER = "x-agentloop-run-id"


class AgentLoopServicer(pb_grpc.AgentLoopServiceServicer):
    """Thin adapter from gRPC to the services."""

    def __init__(
        self, settings: Settings, generation: GenerationService, agent: AgentService,
        embeddings: EmbeddingService | None = None, runs: RunManager | None = None,
    ) -> None:
        self._settings = settings
        self._runs_manager = runs
        self._generation = generation
        self._agent = agent
        self._embeddings = embeddings or EmbeddingService(generation.backend,
                                                          generation.quotas,
                                                          generation.telemetry)

    def _context(self, context: grpc.aio.ServicerContext) -> CallContext:
        return call_context(context.invocation_metadata(), context.peer(), self._settings)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        generation = await read_request(
            bool(request.format.json_schema) or bool(request.tools), generation_request,
            request, self._settings, self._generation.default_model,
            deadline_from(context.time_remaining()),
        )
        generation = dataclasses.replace(
            generation, context=self._context(context))
        result = await self._generation.generate(generation)
        context.set_trailing_metadata(upstream_metadata(result.end))
        return generate_response(result)

    async def StreamGenerate(
        self, request: pb.StreamGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        generation = await read_request(
            bool(request.format.json_schema) or bool(request.tools), generation_request,
            request, self._settings, self._generation.default_model,
            deadline_from(context.time_remaining()),
        )
        generation = dataclasses.replace(
            generation, context=self._context(context))
        async with aclosing(coalesced(self._generation.stream(generation))) as items:
            async for item in items:
                if isinstance(item, str):
                    yield stream_delta(item)
                elif isinstance(item, ToolCallDelta):
                    yield stream_tool_call_delta(item)
                else:
                    context.set_trailing_metadata(upstream_metadata(item))
                    yield stream_end(item)

    async def RunAgent(
        self, request: pb.RunAgentRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunAgentResponse:
        run = run_agent_request(
            request, self._settings, self._agent.tools, self._generation.default_model,
            deadline_from(context.time_remaining()),
        )
        run = dataclasses.replace(run, context=self._context(context))
        return run_agent_response(await self._agent.complete(run))

    async def StreamRunAgent(
        self,
        request_iterator: AsyncIterator[pb.StreamRunAgentRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamRunAgentResponse]:
        requests = aiter(request_iterator)
        start = await self._first_message(requests)
        run = await read_request(
            start is not None and start.HasField("start") and bool(start.start.client_tools),
            start_agent_run, start, self._settings, self._agent.tools,
            self._generation.default_model, deadline_from(context.time_remaining()),
        )
        run = dataclasses.replace(run, context=self._context(context))
        if start is not None and start.start.continue_on_disconnect:
            async with aclosing(self._continued_run(run, requests, context)) as events:
                async for reply in events:
                    yield reply
            return
        async with ToolResultReader(requests) as reader:
            events = reader.watch(self._agent.run(run, reader.calls), answer_delta_key,
                                  join_answer_deltas)
            async with aclosing(events):
                async for event in events:
                    yield agent_event_pb(event)

    async def _continued_run(
        self, run: AgentRun, requests: AsyncIterator[pb.StreamRunAgentRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamRunAgentResponse]:
        """StreamRunAgent as a background run: the stream follows the run, which goes on
        when the stream drops; its id goes out first, in the initial metadata."""
        runs = self._runs
        tenant = run.context.tenant
        run_id = await runs.start_run(dataclasses.replace(run, deadline=None))
        await context.send_initial_metadata(((RUN_ID_HEADER, run_id),))
        problems: list[AgentLoopError] = []

        async def forward_results() -> None:
            try:
                async for message in requests:
                    if message.WhichOneof("kind") != "tool_result":
                        raise InvalidArgument([("start", "after start, only tool results "
                                                              "may be sent")])
                    await runs.submit_tool_result(tenant, run_id,
                                                  client_tool_result(message.tool_result))
            except AgentLoopError as exc:
                problems.append(exc)

        forwarder = asyncio.create_task(forward_results())
        try:
            async with aclosing(runs.watch(tenant, run_id)) as events:
                async for event in events:
                    if problems:
                        raise problems[0]
                    reply = stream_event_pb(event)
                    if reply is not None:
                        yield reply
                    elif isinstance(event.body, RunEnded) and event.body.error:
                        raise FailedPrecondition(
                            f"run {run_id} {event.body.status.value}: {event.body.error}",
                            reason=f"RUN_{event.body.status.name}")
        finally:
            forwarder.cancel()

    @property
    def _runs(self) -> RunManager:
        if self._runs_manager is None:
            raise Unimplemented("this server keeps no background runs")
        return self._runs_manager

    async def StartAgentRun(
        self, request: pb.StartAgentRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartAgentRunResponse:
        started = await read_request(
            bool(request.run.client_tools), start_background_run, request, self._settings,
            self._agent.tools, self._generation.default_model)
        caller = self._context(context)
        run_id = await self._runs.start_run(dataclasses.replace(started.run, context=caller),
                                            timeout=started.timeout,
                                            webhook_url=started.webhook_url,
                                            previous_run_id=started.previous_run_id,
                                            trim_conversation=started.trim_conversation,
                                            webhook_each_step=started.webhook_each_step)
        return pb.StartAgentRunResponse(run=run_pb(await self._runs.get(caller.tenant, run_id)))

    async def GetAgentRun(
        self, request: pb.GetAgentRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAgentRunResponse:
        view = await self._runs.get(self._context(context).tenant, request.run_id)
        return pb.GetAgentRunResponse(run=run_pb(view))

    async def ListAgentRuns(
        self, request: pb.ListAgentRunsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAgentRunsResponse:
        statuses = [STATUSES_OF_PB[s] for s in request.statuses if s in STATUSES_OF_PB]
        views, token = await self._runs.list(self._context(context).tenant, statuses,
                                             request.page_size, request.page_token)
        return pb.ListAgentRunsResponse(runs=[run_pb(v) for v in views], next_page_token=token)

    async def CancelAgentRun(
        self, request: pb.CancelAgentRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelAgentRunResponse:
        view = await self._runs.cancel(self._context(context).tenant, request.run_id)
        return pb.CancelAgentRunResponse(run=run_pb(view))

    async def WatchAgentRun(
        self, request: pb.WatchAgentRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchAgentRunResponse]:
        events = self._runs.watch(self._context(context).tenant, request.run_id,
                                  request.after_sequence)
        async with aclosing(events):
            async for event in events:
                yield run_event_pb(event)

    async def SubmitToolResult(
        self, request: pb.SubmitToolResultRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitToolResultResponse:
        result = client_tool_result(request.tool_result)
        view = await self._runs.submit_tool_result(self._context(context).tenant,
                                                   request.run_id, result)
        return pb.SubmitToolResultResponse(run=run_pb(view))

    async def _first_message(
        self, requests: AsyncIterator[pb.StreamRunAgentRequest]
    ) -> pb.StreamRunAgentRequest | None:
        """The call's first message, within first_message_timeout: a call that sends only
        its headers must not be held (and cost memory) for as long as its connection lives."""
        timeout = self._settings.first_message_timeout
        try:
            async with asyncio.timeout(timeout):
                return await anext(requests, None)
        except TimeoutError:
            raise FirstMessageTimeout(
                f"no first message (start) within {timeout:g}s (first_message_timeout)"
            ) from None

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        backend = self._generation.backend
        models = await backend.list_models()
        return pb.ListModelsResponse(
            models=[model_pb(m) for m in models],
            default_model=backend.default_model,
            backend=backend.name,
        )

    async def ListTools(
        self, request: pb.ListToolsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListToolsResponse:
        return list_tools_response(self._agent.tools)

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        embedding = embedding_request(request, self._settings, self._generation.default_model,
                                      deadline_from(context.time_remaining()))
        embedding = dataclasses.replace(embedding, context=self._context(context))
        return embed_response(await self._embeddings.embed(embedding))

    async def CountTokens(
        self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb.CountTokensResponse:
        counting = token_count_request(request, self._settings, self._generation.default_model,
                                       deadline_from(context.time_remaining()))
        counting = dataclasses.replace(counting, context=self._context(context))
        return count_tokens_response(await self._embeddings.count_tokens(counting))


#: The one thread that reads requests carrying JSON Schemas. One: checking schemas is pure
#: Python, so more threads only fight the event loop for the GIL (60 at once held health
#: checks up for a second); requests wait their turn, and one cancelled meanwhile is dropped.
_SCHEMA_READER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentloop-schemas")


async def read_request(carries_schemas: bool, read: Callable[..., T], *args: Any) -> T:
    """Read a request into its domain form. Checking a caller's JSON Schemas can take a
    while within the limits (the meta-schema, every subschema), so a request carrying them
    is read on the schema reader's thread: the event loop, health checks included, keeps
    running."""
    if carries_schemas:
        context = contextvars.copy_context()  # as asyncio.to_thread does: spans, logs
        return await asyncio.get_running_loop().run_in_executor(
            _SCHEMA_READER, functools.partial(context.run, read, *args))
    return read(*args)
