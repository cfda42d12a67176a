"""Python client and bulk-send CLI for canvas-gateway.

    from canvas_gateway_client import CanvasGatewayClient, bad_request_violations, pb

    async with CanvasGatewayClient("127.0.0.1:50051", token) as client:
        response = await client.send(braze_body)

`pb` is the generated `canvas_gateway.v1.canvas_gateway_pb2` module. The console script
`canvas-gateway` is `canvas_gateway_client.cli`.
"""

from canvas_gateway.v1 import canvas_gateway_pb2 as pb

from .client import (
    DEFAULT_CHUNK_SIZE,
    CanvasGatewayClient,
    FieldViolation,
    KeyForgotten,
    RecipientSource,
    Tracked,
    Waiting,
    bad_request_violations,
    error_info,
    resume_position,
    to_recipient,
    to_trigger,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "CanvasGatewayClient",
    "FieldViolation",
    "KeyForgotten",
    "RecipientSource",
    "Tracked",
    "Waiting",
    "bad_request_violations",
    "error_info",
    "pb",
    "resume_position",
    "to_recipient",
    "to_trigger",
]
