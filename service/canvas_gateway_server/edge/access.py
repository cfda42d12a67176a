"""The access line: one log line per RPC of the gateway's service (logger
`canvas_gateway_server.access`), written by `observer.CallObserver` when the RPC ends."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from ..logs import Counts
from ..model import Outcome, Summary

Context = grpc.aio.ServicerContext[object, object]
log = logging.getLogger("canvas_gateway_server.access")


@dataclass(slots=True)
class Call:
    """One RPC in progress, as its access line will report it."""

    request_id: str
    method: str
    peer: str
    tenant: str = "-"
    summary: Summary | None = None
    header: asyncio.Future[None] | None = None
    """The initial metadata's operation while a unary call has not yet waited for it."""


def details(context: Context) -> str:
    """The status message an RPC ended with (`-` when it has none, e.g. cancelled by its caller):
    what the gateway told the caller, which never holds a secret."""
    details: object = context.details()  # None unless the handler aborted or set them
    return details if isinstance(details, str) and details else "-"


def line(call: Call, code: str, seconds: float, message: str | None = None) -> None:
    """One line per RPC of the gateway's service: who, what, how it ended (with the status
    message, `grpc_message`, when not OK), how long."""
    level = logging.INFO if code == "OK" else logging.WARNING
    if not log.isEnabledFor(level):
        return
    summary = call.summary or Summary()
    outcomes = Counts((o.name.lower(), summary.by_outcome[o]) for o in Outcome)
    refused = {} if message is None else {"grpc_message": message}
    log.log(
        level,
        "rpc %s %s",
        call.method.rpartition("/")[2],
        code,
        extra={
            "tenant": call.tenant,
            "method": call.method,
            "peer": call.peer,
            "grpc_code": code,
            **refused,
            "recipients": summary.recipients,
            "batches": summary.batches,
            "outcomes": outcomes,
            "duration_ms": round(seconds * 1000, 1),
        },
    )
