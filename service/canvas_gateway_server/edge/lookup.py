"""GetResults, FindRecipient, ListUnknown: an earlier request's kept results, read back, never
sent; and Replay's request, checked.

The request is named by its idempotency key or its request id (exactly one); what is read is
the tenant's own (`outcomes.Recorder`, per tenant in every store). Failures are GatewayErrors,
turned into a status by the servicer like a send's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from canvas_gateway.v1 import canvas_gateway_pb2 as pb

from ..errors import InvalidRequest, NotKept, ResultsUnavailable, StoreLost, StoreUnavailable
from ..model import Rule, Summary, Violation
from ..outcomes import Kept, Recorder, identifier_text, key_handle, request_handle
from ..tenants import Tenant
from . import convert


def handle_of(idempotency_key: str, request_id: str) -> str:
    """The record a lookup names: by key or by request id, exactly one of them."""
    if bool(idempotency_key) == bool(request_id):
        why = "name the request by exactly one of idempotency_key, request_id"
        raise InvalidRequest([Violation("request_id", why, Rule.LOOKUP)])
    return key_handle(idempotency_key) if idempotency_key else request_handle(request_id)


async def _read(recorder: Recorder, tenant: Tenant, handle: str) -> list[Kept]:
    if not recorder.enabled:
        raise NotKept("this gateway keeps no results (CGW_RESULTS_KEPT=false)")
    try:
        kept = await recorder.read(tenant.id, handle)
    except (StoreUnavailable, StoreLost):
        raise ResultsUnavailable("the results store did not answer: ask again") from None
    if not kept:
        raise NotKept("no result is kept for that request (unknown, another tenant's, or past its time)")
    return kept


async def get_results(
    recorder: Recorder, tenant: Tenant, request: pb.GetResultsRequest
) -> AsyncIterator[pb.GetResultsResponse]:
    """Every kept result of the request in position order, then their summary."""
    kept = await _read(recorder, tenant, handle_of(request.idempotency_key, request.request_id))
    summary = Summary()
    for item in kept:
        summary.add(item.result)
        yield pb.GetResultsResponse(result=convert.result_to_proto(item.result))
    yield pb.GetResultsResponse(summary=convert.summary_to_proto(summary, request.request_id))


async def find_recipient(
    recorder: Recorder, tenant: Tenant, request: pb.FindRecipientRequest
) -> pb.FindRecipientResponse:
    """The recipient's position and its batch's result; `found` false when not in the request."""
    identifier = identifier_text(convert.recipient_to_dict(request.recipient))
    if not identifier:
        why = "name the recipient by external_user_id, user_alias or email"
        raise InvalidRequest([Violation("recipient", why, Rule.LOOKUP)])
    for item in await _read(recorder, tenant, handle_of(request.idempotency_key, request.request_id)):
        position = item.position_of(identifier)
        if position is not None:
            return pb.FindRecipientResponse(
                found=True, position=position, result=convert.result_to_proto(item.result)
            )
    return pb.FindRecipientResponse(found=False)


async def list_unknown(recorder: Recorder, tenant: Tenant) -> AsyncIterator[pb.ListUnknownResponse]:
    """The tenant's UNKNOWN batches not replayed yet, by request id and batch."""
    try:
        kept = await recorder.unknown(tenant.id)
    except (StoreUnavailable, StoreLost):
        raise ResultsUnavailable("the results store did not answer: ask again") from None
    for item in kept:
        yield pb.ListUnknownResponse(
            idempotency_key=item.origin.key,
            request_id=item.origin.request_id,
            result=convert.result_to_proto(item.result),
        )
