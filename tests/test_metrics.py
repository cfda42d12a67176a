"""Metrics: exact values on each gateway's fresh registry after known traffic, through real gRPC
to the gateway and real HTTP to the fake Braze."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_server import __version__
from canvas_gateway_server.limits import Reserved
from canvas_gateway_server.metrics import (
    RECONCILE_REASONS,
    BatchMetrics,
    EdgeMetrics,
    Metrics,
    ProcessMetrics,
    PrometheusMetrics,
    StateMetrics,
)
from canvas_gateway_server.metrics.batches import PrometheusBatches
from canvas_gateway_server.metrics.edge import PrometheusEdge
from canvas_gateway_server.metrics.levels import Levels
from canvas_gateway_server.metrics.process import PrometheusProcess
from canvas_gateway_server.metrics.state import PrometheusState
from canvas_gateway_server.process import git_commit
from canvas_gateway_server.rate_budget import Ticket
from canvas_gateway_server.reply import Delivery, RateLimit, Reply
from fake_braze import FakeBrazeConfig, Fault
from prometheus_client import CollectorRegistry
from support import KEYS, TOKENS, Harness, standing_clock, until

SERVICE = "canvas_gateway.v1.CanvasGatewayService"
RECONCILED = "canvas_gateway_reconciliation_results_total"
BATCH_LABELS = {"tenant": "acme", "outcome": "sent", "code": "OK"}
PAUSED = "paused-canvas"


def value(h: Harness, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist (yet)."""
    found = h.gateway.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


async def handled(h: Harness, rpc: dict[str, str], code: str, count: int) -> None:
    """Wait until `count` RPCs are counted as handled with `code`: the server counts an RPC once its
    handler has unwound, which may be just after the caller has its status."""
    await until(lambda: value(h, "grpc_server_handled_total", **rpc, grpc_code=code) == count, 5)


def unary(count: int, canvas_id: str = "c", first: int = 0) -> pb.SendRequest:
    recipients = [pb.Recipient(external_user_id=f"u{i}") for i in range(first, first + count)]
    return pb.SendRequest(trigger=pb.CanvasTrigger(canvas_id=canvas_id, recipients=recipients))


async def chunks(
    count: int, per_chunk: int, bad: tuple[int, ...] = ()
) -> AsyncIterator[pb.SendStreamRequest]:
    yield pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c")))
    for start in range(0, count, per_chunk):
        recipients = [
            pb.Recipient() if i in bad else pb.Recipient(external_user_id=f"u{i}")
            for i in range(start, min(start + per_chunk, count))
        ]
        yield pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=recipients))


async def test_120_recipients_are_3_batches_3_calls_and_one_unary_rpc(harness: Harness) -> None:
    await harness.stub.Send(unary(120), metadata=harness.auth())

    assert value(harness, "canvas_gateway_recipients_total", tenant="acme", outcome="sent") == 120
    assert value(harness, "canvas_gateway_batches_total", tenant="acme", outcome="sent", code="OK") == 3
    calls = {"tenant": "acme", "status_class": "2xx", "status": "201"}
    assert value(harness, "canvas_gateway_braze_requests_total", **calls) == 3
    assert value(harness, "canvas_gateway_braze_request_duration_seconds_count", tenant="acme") == 3
    # the fake's hourly budget counts down per call; the gauge holds the last one seen
    limit = value(harness, "canvas_gateway_braze_ratelimit_limit", tenant="acme", budget="recipients")
    remaining = value(harness, "canvas_gateway_braze_ratelimit_remaining", tenant="acme", budget="recipients")
    assert limit == 250_000 and remaining == 250_000 - 3
    assert value(harness, "canvas_gateway_tenant_paused", tenant="acme", budget="recipients") == 0
    for outcome in ("rejected", "unknown", "not_attempted"):
        assert value(harness, "canvas_gateway_recipients_total", tenant="acme", outcome=outcome) == 0

    rpc = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "Send"}
    assert value(harness, "grpc_server_started_total", **rpc) == 1
    await handled(harness, rpc, "OK", 1)
    assert value(harness, "grpc_server_msg_received_total", **rpc) == 1
    assert value(harness, "grpc_server_msg_sent_total", **rpc) == 1
    assert value(harness, "grpc_server_handling_seconds_count", **rpc) == 1
    assert value(harness, "canvas_gateway_batches_in_flight", tenant="acme") == 0


@pytest.mark.parametrize("fake_config", [FakeBrazeConfig(api_keys=frozenset({KEYS["globex"]}))])
async def test_a_revoked_key_is_one_rejected_batch_with_status_401(harness: Harness) -> None:
    reply = await harness.stub.Send(unary(20), metadata=harness.auth())
    assert reply.results[0].braze.http_status == 401

    assert value(harness, "canvas_gateway_recipients_total", tenant="acme", outcome="rejected") == 20
    labels = {"tenant": "acme", "outcome": "rejected", "code": "INTERNAL"}
    assert value(harness, "canvas_gateway_batches_total", **labels) == 1
    calls = {"tenant": "acme", "status_class": "4xx", "status": "401"}
    assert value(harness, "canvas_gateway_braze_requests_total", **calls) == 1
    assert value(harness, "canvas_gateway_recipients_total", tenant="acme", outcome="sent") == 0


async def test_5xx_resets_and_a_429_retry_are_counted_by_kind(harness: Harness) -> None:
    harness.fake.faults.script([Fault.status(503), Fault.reset(), Fault.status(429)])
    for first in (0, 10, 20):  # one call each, one after the other, so the script's order holds
        await harness.stub.Send(unary(10, first=first), metadata=harness.auth())

    assert value(harness, "canvas_gateway_recipients_total", tenant="acme", outcome="unknown") == 20
    assert value(harness, "canvas_gateway_recipients_total", tenant="acme", outcome="sent") == 10
    assert (
        value(harness, "canvas_gateway_batches_total", tenant="acme", outcome="unknown", code="UNKNOWN") == 2
    )
    requests = "canvas_gateway_braze_requests_total"
    assert value(harness, requests, tenant="acme", status_class="5xx", status="503") == 1
    assert value(harness, requests, tenant="acme", status_class="failed", status="unknown") == 1
    assert value(harness, requests, tenant="acme", status_class="4xx", status="429") == 1
    assert value(harness, requests, tenant="acme", status_class="2xx", status="201") == 1
    assert value(harness, "canvas_gateway_retries_total", tenant="acme", reason="rate_limited") == 1
    assert value(harness, "canvas_gateway_rate_limit_wait_seconds_total", tenant="acme") > 0


async def test_replays_under_a_key_are_counted_apart_from_what_happened(harness: Harness) -> None:
    """One keyed send and two repeats: the outcome counters count what happened (the Braze calls),
    once; the replays have counters of their own. Without it, sent batches counted 9 for 3 calls."""
    harness.fake.faults.script([Fault.status(500)])  # batch 0 UNKNOWN (kept), batches 1 and 2 sent
    request = unary(120)
    request.options.idempotency_key = "metrics-replays-1"
    for _ in range(3):
        await harness.stub.Send(request, metadata=harness.auth())

    assert len(harness.fake.calls) == 3
    batches, recipients = "canvas_gateway_batches_total", "canvas_gateway_recipients_total"
    assert value(harness, batches, tenant="acme", outcome="sent", code="OK") == 2
    assert value(harness, batches, tenant="acme", outcome="unknown", code="UNKNOWN") == 1
    assert value(harness, recipients, tenant="acme", outcome="sent") == 70
    assert value(harness, recipients, tenant="acme", outcome="unknown") == 50  # alerted on once
    replayed = "canvas_gateway_replayed_batches_total"
    assert value(harness, replayed, tenant="acme", outcome="sent", code="OK") == 4
    assert value(harness, replayed, tenant="acme", outcome="unknown", code="UNKNOWN") == 2
    again = "canvas_gateway_replayed_recipients_total"
    assert value(harness, again, tenant="acme", outcome="sent") == 140
    assert value(harness, again, tenant="acme", outcome="unknown") == 100
    verdicts = "canvas_gateway_idempotency_total"
    assert value(harness, verdicts, tenant="acme", verdict="claimed") == 3
    assert value(harness, verdicts, tenant="acme", verdict="kept") == 6


@pytest.mark.parametrize(
    "fake_config", [FakeBrazeConfig(api_keys=frozenset(KEYS.values()), paused_canvases=frozenset({PAUSED}))]
)
async def test_recipients_of_an_inactive_canvas_are_counted_apart(harness: Harness) -> None:
    await harness.stub.Send(unary(7, canvas_id=PAUSED), metadata=harness.auth())
    await harness.stub.Send(unary(5), metadata=harness.auth())
    assert value(harness, "canvas_gateway_recipients_total", tenant="acme", outcome="canvas_inactive") == 7
    assert value(harness, "canvas_gateway_recipients_total", tenant="acme", outcome="sent") == 5
    labels = {"tenant": "acme", "outcome": "canvas_inactive", "code": "FAILED_PRECONDITION"}
    assert value(harness, "canvas_gateway_batches_total", **labels) == 1


STILL = standing_clock()


# The fake's window and the gateway's clock stand still: the hour cannot turn during the test.
@pytest.mark.parametrize(
    ("fake_config", "clock"),
    [(FakeBrazeConfig(api_keys=frozenset(KEYS.values()), hourly_limit=2, clock=STILL), STILL)],
)
async def test_a_spent_budget_pauses_the_tenant_until_its_reset(harness: Harness) -> None:
    reply = await harness.stub.Send(unary(150), metadata=harness.auth())
    outcomes = sorted(r.outcome for r in reply.results)
    assert outcomes == [pb.OUTCOME_SENT, pb.OUTCOME_SENT, pb.OUTCOME_REJECTED]

    budget = {"tenant": "acme", "budget": "recipients"}
    assert value(harness, "canvas_gateway_braze_ratelimit_remaining", **budget) == 0
    assert value(harness, "canvas_gateway_tenant_paused", **budget) == 1
    reset = value(harness, "canvas_gateway_tenant_paused_until_timestamp_seconds", **budget)
    assert reset == max(r.rate_limit_reset.seconds for r in reply.results)
    labels = {"tenant": "acme", "outcome": "rejected", "code": "RESOURCE_EXHAUSTED"}
    assert value(harness, "canvas_gateway_batches_total", **labels) == 1
    assert (
        value(harness, "canvas_gateway_braze_requests_total", tenant="acme", status_class="2xx", status="201")
        == 2
    )


async def test_a_stream_counts_its_messages_and_rejected_recipients(harness: Harness) -> None:
    results = 0
    call = harness.stub.SendStream(chunks(230, 100, bad=(3, 150)), metadata=harness.auth())
    async for response in call:
        results += response.HasField("result")
    # 228 valid recipients: 4 full batches and one of 28, plus 2 rejected recipients
    assert results == 7

    rpc = {"grpc_type": "bidi_stream", "grpc_service": SERVICE, "grpc_method": "SendStream"}
    assert value(harness, "grpc_server_msg_received_total", **rpc) == 1 + 3
    # and the summary (without a key, no empty message before the last, open batch)
    assert value(harness, "grpc_server_msg_sent_total", **rpc) == results + 1
    await handled(harness, rpc, "OK", 1)
    assert value(harness, "canvas_gateway_recipients_total", tenant="acme", outcome="sent") == 228
    assert value(harness, "canvas_gateway_recipients_total", tenant="acme", outcome="rejected") == 2
    labels = {"tenant": "acme", "outcome": "rejected", "code": "INVALID_ARGUMENT"}
    assert value(harness, "canvas_gateway_batches_total", **labels) == 2
    assert value(harness, "canvas_gateway_validation_failures_total", rule="identifier_count") == 2
    # nothing is left open or buffered once the stream is over
    assert value(harness, "canvas_gateway_streams_open", tenant="acme") == 0
    assert value(harness, "canvas_gateway_results_buffered", tenant="acme") == 0
    assert value(harness, "canvas_gateway_batches_in_flight", tenant="acme") == 0


@pytest.mark.parametrize("settings_overrides", [{"result_queue_size": 4}])
async def test_an_open_stream_and_its_unread_results_are_visible(harness: Harness) -> None:
    call = harness.stub.SendStream(chunks(100_000, 1000), metadata=harness.auth())
    first = await call.read()
    assert isinstance(first, pb.SendStreamResponse) and first.HasField("result")
    assert value(harness, "canvas_gateway_streams_open", tenant="acme") == 1
    # the caller stops reading: once gRPC's own buffers are full, results wait in the stream's queue
    await until(lambda: value(harness, "canvas_gateway_results_buffered", tenant="acme") == 4)
    while (response := await call.read()) is not grpc.aio.EOF:
        assert isinstance(response, pb.SendStreamResponse)
    assert value(harness, "canvas_gateway_streams_open", tenant="acme") == 0
    assert value(harness, "canvas_gateway_results_buffered", tenant="acme") == 0


async def test_results_logged_for_reconciliation_are_counted_once_each(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller that stops reading and goes away: the results it never read or may not have read
    are logged at ERROR, one line each, and counted, so that an alert can say someone must read them."""
    caplog.set_level(logging.ERROR, logger="canvas_gateway_server.reporting")
    for reason in RECONCILE_REASONS:  # at 0 from the start, so increase() sees the first
        assert (
            harness.gateway.registry.get_sample_value(
                "canvas_gateway_reconciliation_results_total", {"tenant": "acme", "reason": reason}
            )
            == 0
        )
    call = harness.stub.SendStream(chunks(100_000, 1000), metadata=harness.auth())
    assert isinstance(await call.read(), pb.SendStreamResponse)
    await until(lambda: value(harness, "canvas_gateway_results_buffered", tenant="acme") > 0)
    call.cancel()
    await until(lambda: value(harness, "canvas_gateway_streams_open", tenant="acme") == 0)
    await until(lambda: not harness.gateway.servicer.in_flight.busy)

    def lines(text: str) -> int:
        return sum(1 for r in caplog.records if r.levelno == logging.ERROR and text in r.getMessage())

    undelivered = value(harness, RECONCILED, tenant="acme", reason="undelivered")
    unread = value(harness, RECONCILED, tenant="acme", reason="unread")
    # Those still queued are undelivered; those gRPC took are unread (the one read among them):
    # which is which depends on when the cancel lands, not their sum.
    assert unread >= 1 and undelivered + unread >= 2
    assert undelivered == lines("not delivered (the caller stopped reading or went away)")
    assert unread == lines("may not have been read (the stream was cut off)")


async def test_a_refused_request_counts_each_rule_it_broke(harness: Harness) -> None:
    request = unary(3, canvas_id="")
    request.trigger.recipients[1].ClearField("external_user_id")
    request.trigger.recipients[2].email = "not-an-address"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.Send(request, metadata=harness.auth())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    failures = "canvas_gateway_validation_failures_total"
    assert value(harness, failures, rule="canvas_id_required") == 1
    assert value(harness, failures, rule="identifier_count") == 1
    assert value(harness, failures, rule="email_format") == 1
    assert value(harness, failures, rule="prioritization_required") == 1
    rpc = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "Send"}
    await handled(harness, rpc, "INVALID_ARGUMENT", 1)
    assert harness.fake.calls == []


async def test_refused_tokens_are_counted_without_a_tenant(harness: Harness) -> None:
    for metadata in ((), (("authorization", "Bearer not-a-token"),), (("authorization", "Basic x"),)):
        with pytest.raises(grpc.aio.AioRpcError):
            await harness.stub.Send(unary(1), metadata=metadata)
    assert value(harness, "canvas_gateway_auth_failures_total", reason="missing_token") == 2
    assert value(harness, "canvas_gateway_auth_failures_total", reason="unknown_token") == 1
    rpc = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "Send"}
    await handled(harness, rpc, "UNAUTHENTICATED", 3)


async def test_reloads_and_tenants_build_info_and_readiness(harness: Harness) -> None:
    assert value(harness, "canvas_gateway_tenants") == 3
    assert value(harness, "canvas_gateway_ready") == 1
    # the series alerts take increase() of exist at 0 before the first event, so it is seen
    registry = harness.gateway.registry
    for tenant in ("acme", "globex", "initech"):
        for outcome in ("sent", "rejected", "unknown", "not_attempted", "canvas_inactive"):
            labels = {"tenant": tenant, "outcome": outcome}
            assert registry.get_sample_value("canvas_gateway_recipients_total", labels) == 0
        sent = {"tenant": tenant, "outcome": "sent", "code": "OK"}  # CanvasGatewayNoSuccessfulSends
        assert registry.get_sample_value("canvas_gateway_batches_total", sent) == 0
    for result in ("success", "failure"):
        assert registry.get_sample_value("canvas_gateway_tenant_reloads_total", {"result": result}) == 0
    for reason in ("missing_token", "unknown_token"):
        assert registry.get_sample_value("canvas_gateway_auth_failures_total", {"reason": reason}) == 0
    info = list(harness.gateway.registry.collect())
    build = next(m for m in info if m.name == "canvas_gateway_build")
    (sample,) = build.samples
    assert sample.labels["version"] == __version__ and sample.labels["git_commit"]
    assert git_commit({"CANVAS_GATEWAY_GIT_COMMIT": "0c3081e5"}) == "0c3081e5"  # the image's build arg

    tenants_file = Path(harness.gateway.settings.tenants.file)
    good = tenants_file.read_text()
    tenants_file.write_text(good.split("\n[tenants.globex]")[0])
    harness.gateway.reload_tenants()
    tenants_file.write_text("broken [")
    harness.gateway.reload_tenants()
    assert value(harness, "canvas_gateway_tenant_reloads_total", result="success") == 1
    assert value(harness, "canvas_gateway_tenant_reloads_total", result="failure") == 1
    assert value(harness, "canvas_gateway_tenants") == 1  # a failed reload keeps what was loaded


@pytest.mark.parametrize(
    "fake_config",
    [FakeBrazeConfig(api_keys=frozenset({KEYS["globex"]}), error_rates={503: 0.2, 429: 0.2}, seed=7)],
)
async def test_no_label_anywhere_holds_a_key_or_a_token(harness: Harness) -> None:
    # acme's key is refused (Braze's 401 echoes it); globex meets random 503s and 429s
    for tenant in ("acme", "globex"):
        await harness.stub.Send(unary(200), metadata=harness.auth(tenant))
    with pytest.raises(grpc.aio.AioRpcError):
        await harness.stub.Send(unary(1), metadata=(("authorization", f"Bearer {KEYS['acme']}"),))
    text = await scrape(harness)
    labels = " ".join(re.findall(r"\{([^}]*)\}", text))
    assert 'status="401"' in labels and 'status="503"' in labels  # the faults did happen
    for secret in (*KEYS.values(), *TOKENS.values()):
        assert secret not in text


async def test_the_exposition_has_no_created_series_in_either_format(harness: Harness) -> None:
    await harness.stub.Send(unary(60), metadata=harness.auth())
    registry = harness.gateway.registry  # the registry keeps them; the exposition leaves them out
    assert registry.get_sample_value("canvas_gateway_batches_created", BATCH_LABELS) is not None
    for accept in ("text/plain", "application/openmetrics-text; version=1.0.0"):
        text = await scrape(harness, Accept=accept)
        assert 'canvas_gateway_batches_total{code="OK",outcome="sent",tenant="acme"} 2.0' in text
        assert "grpc_server_handling_seconds_bucket" in text  # histograms keep their buckets
        assert [line for line in text.splitlines() if "_created" in line] == [], accept


@pytest.mark.parametrize("settings_overrides", [{"metrics_enabled": False}])
async def test_metrics_can_be_turned_off(harness: Harness) -> None:
    await harness.stub.Send(unary(60), metadata=harness.auth())
    assert "canvas_gateway_" not in await scrape(harness)
    assert "grpc_server_" not in await scrape(harness)


async def scrape(h: Harness, **headers: Any) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{h.gateway.admin_port}/metrics", headers=headers) as reply,
    ):
        assert reply.status == 200
        return await reply.text()


async def test_the_event_loop_lag_is_sampled_twice_a_second(harness: Harness) -> None:
    await asyncio.sleep(1.2)
    assert value(harness, "canvas_gateway_event_loop_lag_seconds_count") >= 2
    assert value(harness, "canvas_gateway_event_loop_lag_seconds_sum") < 0.5  # an idle loop is on time
    asyncio.get_running_loop().call_soon(time.sleep, 0.7)  # a callback blocks the loop past a sample
    await asyncio.sleep(1.2)
    assert value(harness, "canvas_gateway_event_loop_lag_seconds_bucket", le="0.1") < value(
        harness, "canvas_gateway_event_loop_lag_seconds_count"
    )


def test_every_concern_counts_its_whole_port_and_they_compose_without_a_clash() -> None:
    """A port method left to its no-op base in `PrometheusMetrics`, or two concerns keeping an
    attribute under one name on the one instance they share, fails here."""
    ports = {EdgeMetrics, BatchMetrics, StateMetrics, ProcessMetrics, Metrics}
    events = [name for name in dir(Metrics) if not name.startswith("_")]
    assert len(events) == 30
    ignored = [
        name
        for name in events
        if next(cls for cls in PrometheusMetrics.__mro__ if name in vars(cls)) in ports
    ]
    assert ignored == []

    levels = Levels(time.time)
    concerns = [
        vars(PrometheusEdge(CollectorRegistry(), levels)),
        vars(PrometheusBatches(CollectorRegistry(), levels, invalid=Metrics().invalid)),
        vars(PrometheusState(CollectorRegistry())),
        vars(PrometheusProcess(CollectorRegistry(), version="t", git_commit="t")),
    ]
    shared = {
        name
        for i, one in enumerate(concerns)
        for other in concerns[i + 1 :]
        for name in one.keys() & other.keys()
    }
    assert shared == {"_levels"}  # the one collector, the same object in both


def test_the_gateways_spent_calls_in_a_window_are_the_most_any_reply_told_of() -> None:
    """Two calls reserved as the gateway's 4th and 5th of a window, answered in the other order:
    the gauge stays at 5 (it only grows within a window), and a new window starts from its own."""
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry, version="test", git_commit="test")

    def answer(ours: int, remaining: int, reset: int) -> float | None:
        reserved = Reserved((Ticket(("shop", "recipients"), ours=ours),))
        reply = Reply(Delivery.RESPONDED, 201, rate=RateLimit(limit=20, remaining=remaining, reset=reset))
        metrics.budget(reserved, None, reply)
        labels = {"workspace": "shop", "pool": "recipients", "spender": "gateway"}
        return registry.get_sample_value("canvas_gateway_budget_spent_calls", labels)

    assert answer(5, 16, 1000) == 4  # no more than Braze counted yet
    assert answer(4, 15, 1000) == 5
    assert answer(1, 19, 2000) == 1
