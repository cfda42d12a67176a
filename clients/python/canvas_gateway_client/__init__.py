"""Python client and bulk-send CLI for canvas-gateway.

    from canvas_gateway_client import CanvasGatewayClient, bad_request_violations, pb

    async with CanvasGatewayClient("127.0.0.1:50051", token) as client:
        response = await client.send(braze_body)

`pb` is the generated `canvas_gateway.v1.canvas_gateway_pb2` module (distribution
canvas-gateway-stubs). The console script `canvas-gateway` is `canvas_gateway_client.cli`.

This module is the package's public face; the modules behind it, by job:

    client       CanvasGatewayClient: the channel's life, the unary Send, send_stream's entry
    connection   channel options, the bearer token's check and metadata, the request id
    recipients   triggers and recipients from messages or Braze JSON, read lazily in chunks
    streaming    the streams of one send_stream and their resumes (Waiting)
    spreading    a send over several connections, in parts (PART_SIZE, part_key: a keyed
                 send's parts do not depend on the connections)
    tracking     results in the caller's terms across streams (Tracked), the summary
    keyed        the same under an idempotency key (KeyForgotten when the gateway lost it)
    errors       the gateway's error details: field violations, ErrorInfo, resume_position
    cli          the `canvas-gateway` command's run, with its arguments, exits (statuses),
                 commands, console (what it prints), inputs and rows (files read), report
                 (the results file and progress)
"""

from canvas_gateway.v1 import canvas_gateway_pb2 as pb

from .client import CanvasGatewayClient
from .errors import FieldViolation, KeyForgotten, bad_request_violations, error_info, resume_position
from .recipients import DEFAULT_CHUNK_SIZE, RecipientSource, to_recipient, to_trigger
from .spreading import PART_SIZE, part_key
from .streaming import Waiting
from .tracking import Tracked

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "PART_SIZE",
    "CanvasGatewayClient",
    "FieldViolation",
    "KeyForgotten",
    "RecipientSource",
    "Tracked",
    "Waiting",
    "bad_request_violations",
    "error_info",
    "part_key",
    "pb",
    "resume_position",
    "to_recipient",
    "to_trigger",
]
