"""Where a recipient's CPU goes in the gateway: each stage timed alone, in microseconds.

The profile behind the headline ratio (py-spy on a gateway under `stream_throughput` points
at the same stages). Each stage is the gateway's own code, run here in a loop over the
benchmark's recipients (an external_user_id and a one-key context), best of 5:

  parse       protobuf decode of 500-recipient chunks (upb, C)
  to JSON     `convert.recipient_to_dict`: protobuf Struct values into Python objects
  check+cut   `Intake.take`: the rules, orjson, and cutting batches of 50
  result      a batch's result message, built and serialised, per recipient
  gRPC write  a bare grpc.aio server streaming 300-byte messages, server CPU per message
              divided by 50: what each result costs gRPC itself, whatever the gateway does
  compiled    the stream's whole recipient path, Python (`parse` + `to JSON` + `check+cut`) against
              the compiled one (`edge.native`: chunk bytes straight to each recipient's JSON, then
              `Intake.take_encoded`), in alternating rounds, on the benchmark's recipients and
              on recipients with a 12-key context: microseconds each and their ratio in one run
  sorted keys orjson with OPT_SORT_KEYS (the gateway's canonical bodies, which keep an
              idempotency digest equal whatever the map order) against plain orjson, on the
              benchmark's recipients and on recipients with a 12-key context: a ratio of one
              run, and the microseconds it adds per recipient

The direct client's whole CPU per recipient (`stream_throughput`) is the yardstick.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import timeit
from collections.abc import AsyncIterator, Callable

import grpc
import orjson
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_server.edge import convert, native
from canvas_gateway_server.model import BatchResult, Code, Outcome
from canvas_gateway_server.planning import Intake
from harness import CANVAS, CONTEXT, Figure, chunk, cpu_seconds, free_port

MEASURE = "breakdown"


def _best(run: Callable[[], object], per: int) -> float:
    return min(timeit.repeat(run, number=1, repeat=5)) / per * 1e6


def _alternating(one: Callable[[], object], other: Callable[[], object], per: int) -> tuple[float, float]:
    """Two runs compared: rounds of each in turn, the best of 9 each (a busy core slows both)."""
    best = [math.inf, math.inf]
    for _ in range(9):
        for slot, run in enumerate((one, other)):
            best[slot] = min(best[slot], timeit.timeit(run, number=1) / per * 1e6)
    return best[0], best[1]


def _serve(port: int) -> None:
    async def main() -> None:
        async def messages(request: bytes, _: object) -> AsyncIterator[bytes]:
            payload = b"x" * 300
            for _ in range(int.from_bytes(request, "big")):
                yield payload

        handler = grpc.unary_stream_rpc_method_handler(messages)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("b.B", {"M": handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


async def grpc_message_cost(messages: int) -> float:
    """Server CPU per streamed message of a bare grpc.aio server, in its own process."""
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(port,), daemon=True)
    server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            call = channel.unary_stream("/b.B/M")
            async for _ in call((1_000).to_bytes(4, "big")):  # warm up
                pass
            assert server.pid is not None
            before = cpu_seconds(server.pid)
            async for _ in call(messages.to_bytes(4, "big")):
                pass
            return (cpu_seconds(server.pid) - before) / messages * 1e6
    finally:
        server.terminate()
        server.join(10)


def _chunk(rows: list[dict[str, object]]) -> bytes:
    message = pb.SendStreamRequest()
    for row in rows:
        message.chunk.recipients.add(external_user_id=row["external_user_id"]).context.update(row["context"])
    return message.SerializeToString()


def _python_path(raws: list[bytes]) -> Callable[[], None]:
    def run() -> None:
        intake = Intake({"canvas_id": CANVAS, "context": CONTEXT})
        for raw in raws:
            for recipient in pb.SendStreamRequest.FromString(raw).chunk.recipients:
                intake.take(convert.recipient_to_dict(recipient))

    return run


def _compiled_path(raws: list[bytes], encode: native.RecipientEncoder) -> Callable[[], None]:
    def run() -> None:
        intake = Intake({"canvas_id": CANVAS, "context": CONTEXT})
        for raw in raws:
            encoded = encode(raw, intake.context_name, intake.encoded_limit)
            assert encoded is not None
            take = intake.take_encoded
            for each in encoded:
                take(each)

    return run


async def measure(smoke: bool) -> list[Figure]:
    n = 2_000 if smoke else 50_000
    chunks = [chunk(range(start, start + 500)).SerializeToString() for start in range(0, n, 500)]
    parsed = [pb.SendStreamRequest.FromString(raw) for raw in chunks]
    recipients = [recipient for message in parsed for recipient in message.chunk.recipients]
    dicts = [convert.recipient_to_dict(recipient) for recipient in recipients]

    def take_all() -> None:
        intake = Intake({"canvas_id": CANVAS, "context": CONTEXT})
        for each in dicts:
            intake.take(each)

    result = BatchResult(
        7, tuple(range(350, 400)), Outcome.SENT, Code.OK, "accepted",
        dispatch_id="0123456789abcdef0123456789abcdef", message="success", http_status=201, attempts=1,
    )  # fmt: skip

    def results() -> None:
        for _ in range(n // 50):
            pb.SendStreamResponse(result=convert.result_to_proto(result)).SerializeToString()

    def parse() -> None:
        for raw in chunks:
            pb.SendStreamRequest.FromString(raw)

    def to_json() -> None:
        for recipient in recipients:
            convert.recipient_to_dict(recipient)

    many = [{**each, "context": {f"key{k}": f"v{k}" if k % 2 else k for k in range(12)}} for each in dicts]

    def encoder(rows: list[dict[str, object]], option: int) -> Callable[[], None]:
        def encode() -> None:
            for row in rows:
                orjson.dumps(row, option=option)

        return encode

    compiled: list[Figure] = []
    compiled_path = native.load()
    for shape, rows in (("1-key context", dicts), ("12-key context", many)):
        raws = [_chunk(rows[start : start + 500]) for start in range(0, len(rows), 500)]
        if compiled_path is None:
            compiled.append(Figure(MEASURE, "compiled path: NOT INSTALLED (make install builds it)", 0, "us"))
            break
        python, fast = _alternating(_python_path(raws), _compiled_path(raws, compiled_path.chunk), n)
        compiled += [
            Figure(MEASURE, f"compiled path: Python parse+to JSON+check+cut, {shape}", python, "us"),
            Figure(MEASURE, f"compiled path: compiled chunk to JSON+cut, {shape}", fast, "us"),
            Figure(MEASURE, f"compiled path: compiled / Python, {shape}", fast / python, "x"),
        ]
    sorted_keys: list[Figure] = []
    for shape, rows in (("1-key context", dicts), ("12-key context", many)):
        plain, canonical = _alternating(encoder(rows, 0), encoder(rows, orjson.OPT_SORT_KEYS), n)
        sorted_keys += [
            Figure(MEASURE, f"sorted keys: orjson encode, {shape}, sorted / plain", canonical / plain, "x"),
            Figure(MEASURE, f"sorted keys: added per recipient, {shape}", canonical - plain, "us"),
        ]
    figures = [
        Figure(MEASURE, "parse: protobuf chunks", _best(parse, n), "us"),
        Figure(MEASURE, "to JSON: Struct and fields to Python", _best(to_json, n), "us"),
        Figure(MEASURE, "check+cut: rules, orjson, batches of 50", _best(take_all, n), "us"),
        Figure(MEASURE, "result: message per batch, per recipient", _best(results, n), "us"),
        *compiled,
        *sorted_keys,
    ]
    per_message = await grpc_message_cost(500 if smoke else 20_000)
    figures.append(Figure(MEASURE, "gRPC write: bare grpc.aio, per result / 50", per_message / 50, "us"))
    return figures
