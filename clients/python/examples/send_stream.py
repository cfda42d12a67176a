"""send-stream: the recipients streamed in chunks, each batch's result printed as it arrives,
then the summary (clients/README.md). The client library reads the recipients lazily, one
chunk ahead of the network, while the results come back."""

from __future__ import annotations

import asyncio
import sys

import common
import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb


async def main() -> int:
    args = common.parse("send-stream", sys.argv[1:])
    results: list[pb.BatchResult] = []
    async with common.client(args) as client:
        try:
            async for response in client.send_stream(
                common.trigger(args.canvas_id, args.context_keys),
                common.recipients(args.recipients, args.context_keys),
                chunk_size=args.chunk_size,
                idempotency_key=args.idempotency_key,
            ):
                if response.HasField("result"):
                    results.append(response.result)
                    common.print_result(response.result)
                else:
                    common.print_summary(response.summary)
        except grpc.aio.AioRpcError as error:
            return common.report_error(error)
    return common.exit_status(results)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
