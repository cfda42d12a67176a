"""The after-the-fact RPCs of the edge: GetResults, FindRecipient, ListUnknown and Replay.

They answer from what the gateway kept (`lookup`, over the sender's recorder), never calling
Braze, except Replay, which sends kept UNKNOWN batches again for a caller who acknowledged
duplicates. They share the send path's authentication, decoding, deadline and failure mapping
(`servicer.CanvasGatewayServicer`) and its count of RPCs in flight; `servicer.add_to_server`
registers them under the one service name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import NoReturn, Protocol

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb

from ..context import RequestContext
from ..sending import Sender
from ..tenants import Tenant
from . import convert, lookup, observer
from .admission import InFlight

Context = grpc.aio.ServicerContext[object, object]


class SendPath(Protocol):
    """What the after-the-fact RPCs share with the send path (`servicer.CanvasGatewayServicer`)."""

    in_flight: InFlight

    @property
    def sender(self) -> Sender: ...

    def authenticate(self, context: Context) -> Tenant: ...

    def request_context(
        self, tenant: Tenant, options: pb.SendOptions, context: Context
    ) -> RequestContext: ...

    async def abort(self, context: Context, error: BaseException) -> NoReturn: ...


class ResultQueries:
    """The after-the-fact RPCs, over the send path's servicer (its tenant, sender, in-flight count)."""

    def __init__(self, edge: SendPath) -> None:
        self._edge = edge

    async def GetResults(self, raw: bytes, context: Context) -> AsyncIterator[pb.GetResultsResponse]:
        """An earlier request's kept results (`lookup`), never calling Braze."""
        with self._edge.in_flight:
            try:
                tenant = self._edge.authenticate(context)
                request = convert.decode(pb.GetResultsRequest, raw, "request", context)
                async for response in lookup.get_results(self._edge.sender.recorder, tenant, request):
                    yield response
            except Exception as exc:
                await self._edge.abort(context, exc)

    async def FindRecipient(self, raw: bytes, context: Context) -> pb.FindRecipientResponse:
        """One recipient of an earlier request: its position and its batch's kept result."""
        with self._edge.in_flight:
            try:
                tenant = self._edge.authenticate(context)
                request = convert.decode(pb.FindRecipientRequest, raw, "request", context)
                return await lookup.find_recipient(self._edge.sender.recorder, tenant, request)
            except Exception as exc:
                await self._edge.abort(context, exc)

    async def ListUnknown(self, raw: bytes, context: Context) -> AsyncIterator[pb.ListUnknownResponse]:
        """The tenant's UNKNOWN batches not replayed yet."""
        with self._edge.in_flight:
            try:
                tenant = self._edge.authenticate(context)
                convert.decode(pb.ListUnknownRequest, raw, "request", context)
                async for response in lookup.list_unknown(self._edge.sender.recorder, tenant):
                    yield response
            except Exception as exc:
                await self._edge.abort(context, exc)

    async def Replay(self, raw: bytes, context: Context) -> pb.ReplayResponse:
        """Send kept UNKNOWN batches again, once, for a caller who acknowledged duplicates."""
        with self._edge.in_flight:
            try:
                tenant = self._edge.authenticate(context)
                request = convert.decode(pb.ReplayRequest, raw, "request", context)
                handle = lookup.handle_of(request.idempotency_key, request.request_id)
                request_context = self._edge.request_context(tenant, pb.SendOptions(), context)
                done, summary = await self._edge.sender.replayer.replay(
                    request_context, handle, list(request.batch_indexes), request.acknowledge_duplicates
                )
                observer.note(summary=summary)
                return pb.ReplayResponse(
                    results=[convert.result_to_proto(result) for result in done],
                    summary=convert.summary_to_proto(summary, request_context.request_id),
                )
            except Exception as exc:
                await self._edge.abort(context, exc)
