"""Streams a caller may hold: capped per tenant and in all (RESOURCE_EXHAUSTED past a cap, the
slot given back however a stream ends), and ended when idle, after the results of what was sent
and with where to resume."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status
from support import Harness

CAPS = {"max_streams_per_tenant": 2, "max_streams": 3}
IDLE = {"stream_idle_timeout_seconds": 0.3}


def _header(recipients: int = 0, canvas_id: str = "c") -> pb.SendStreamRequest:
    people = [pb.Recipient(external_user_id=f"u{i}") for i in range(recipients)]
    trigger = pb.CanvasTrigger(canvas_id=canvas_id, recipients=people)
    return pb.SendStreamRequest(header=pb.StreamHeader(trigger=trigger))


class Open:
    """A stream that has sent its header and holds its slot until `end`."""

    def __init__(self, harness: Harness, tenant: str, first: pb.SendStreamRequest | None = None) -> None:
        self._done = asyncio.Event()
        self.call = harness.stub.SendStream(self._messages(first or _header()), metadata=harness.auth(tenant))

    async def _messages(self, first: pb.SendStreamRequest) -> AsyncIterator[pb.SendStreamRequest]:
        yield first
        await self._done.wait()
        last = pb.Recipient(external_user_id="last")
        yield pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=[last]))

    async def end(self) -> list[pb.SendStreamResponse]:
        self._done.set()
        return [response async for response in self.call]


async def _refusal(harness: Harness, tenant: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await Open(harness, tenant).end()
    return caught.value


async def _held(harness: Harness, expected: int) -> None:
    """Wait until the gateway counts `expected` streams open (each takes its slot on arrival)."""
    for _ in range(200):
        if harness.gateway.servicer.streams.open == expected:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{harness.gateway.servicer.streams.open} streams open, not {expected}")


@pytest.mark.parametrize("settings_overrides", [CAPS])
async def test_streams_past_a_tenant_s_cap_or_the_gateway_s_are_refused(harness: Harness) -> None:
    acme = [Open(harness, "acme"), Open(harness, "acme")]
    await _held(harness, 2)
    refused = await _refusal(harness, "acme")
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.details() == (
        "this tenant already has 2 streams open, the most one tenant may (CGW_MAX_STREAMS_PER_TENANT): "
        "end one first; nothing was sent"
    )
    globex = Open(harness, "globex")  # another tenant still gets in, up to the gateway's cap
    await _held(harness, 3)
    refused = await _refusal(harness, "initech")
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.details() == (
        "this gateway already has 3 streams open, the most it takes (CGW_MAX_STREAMS): try again shortly; "
        "nothing was sent"
    )
    for stream in (*acme, globex):
        assert (await stream.end())[-1].summary.recipients_sent == 1
    assert harness.gateway.servicer.streams.open == 0
    assert len(harness.fake.calls) == 3  # the refused ones sent nothing


@pytest.mark.parametrize("settings_overrides", [CAPS])
async def test_a_stream_gives_its_slot_back_however_it_ends(harness: Harness) -> None:
    bad = [Open(harness, "acme", _header(canvas_id="")) for _ in range(3)]  # refused headers
    for stream in bad:
        with pytest.raises(grpc.aio.AioRpcError):
            await stream.end()
    cancelled = Open(harness, "acme")
    await _held(harness, 1)
    cancelled.call.cancel()
    await _held(harness, 0)
    again = [Open(harness, "acme"), Open(harness, "acme")]  # the tenant's two slots are free
    for stream in again:
        assert (await stream.end())[-1].summary.recipients_sent == 1


@pytest.mark.parametrize("settings_overrides", [IDLE])
async def test_an_idle_stream_ends_after_its_results_with_where_to_resume(harness: Harness) -> None:
    stream = Open(harness, "acme", _header(recipients=3))  # a partial batch, held for more
    results = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(10):  # without an idle timeout it would never end
            async for response in stream.call:
                results.append(response.result)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.details() == (
        "the stream sent nothing for 0.3 s: recipients from position 3 on were not read and "
        "NOT_ATTEMPTED batches were not sent; send them again"
    )
    (result,) = results
    assert (result.outcome, list(result.positions), result.code) == (
        pb.OUTCOME_NOT_ATTEMPTED,
        [0, 1, 2],
        code_pb2.ABORTED,
    )
    assert _resume(caught.value) == ("STREAM_IDLE", "3")
    assert not harness.fake.calls
    await stream.end()


@pytest.mark.parametrize("settings_overrides", [IDLE])
async def test_a_stream_waiting_for_its_batches_is_not_idle(harness: Harness) -> None:
    harness.fake.faults.set_latency(0.8)  # the caller waits on a batch longer than the idle timeout
    began = time.monotonic()
    stream = Open(harness, "acme", _header(recipients=60))
    results = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(10):  # without an idle timeout it would never end
            async for response in stream.call:
                results.append(response.result)
    lasted = time.monotonic() - began
    sizes = [(r.outcome, len(r.positions)) for r in results]
    assert sizes == [(pb.OUTCOME_SENT, 50), (pb.OUTCOME_NOT_ATTEMPTED, 10)]
    assert _resume(caught.value) == ("STREAM_IDLE", "60")
    assert lasted >= 0.8 + 0.3  # idle counts from the batch's end, not from the last message
    await stream.end()


@pytest.mark.parametrize("settings_overrides", [IDLE])
async def test_a_slow_but_steady_caller_is_not_idle(harness: Harness) -> None:
    async def messages() -> AsyncIterator[pb.SendStreamRequest]:
        yield _header()
        for index in range(6):
            await asyncio.sleep(0.15)  # 0.9 s in all, each gap well inside the idle timeout
            yield pb.SendStreamRequest(
                chunk=pb.RecipientChunk(recipients=[pb.Recipient(external_user_id=f"u{index}")])
            )

    responses = [r async for r in harness.stub.SendStream(messages(), metadata=harness.auth())]
    assert responses[-1].summary.recipients_sent == 6


def _resume(error: grpc.aio.AioRpcError) -> tuple[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason, info.metadata["resume_position"]
    raise AssertionError("no ErrorInfo")
