"""send: one unary Send of all the recipients, each batch's result printed (clients/README.md).
With --bad-email the gateway refuses the whole call with INVALID_ARGUMENT and BadRequest
details, and nothing is sent."""

from __future__ import annotations

import asyncio
import sys

import common
import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb


async def main() -> int:
    args = common.parse("send", sys.argv[1:])
    trigger = common.trigger(args.canvas_id, args.context_keys)
    trigger.recipients.extend(common.recipients(args.recipients, args.context_keys))
    if args.bad_email:
        trigger.recipients.append(pb.Recipient(email="not-an-email"))
    async with common.client(args) as client:
        try:
            reply = await client.send(trigger, timeout=60, idempotency_key=args.idempotency_key)
        except grpc.aio.AioRpcError as error:
            return common.report_error(error)
    for result in reply.results:
        common.print_result(result)
    common.print_summary(reply.summary)
    return common.exit_status(reply.results)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
