"""The dashboard and the alerts against a real Prometheus scraping a real gateway.

A gateway (the harness of conftest.py) sends real traffic through gRPC to the fake Braze: sends,
a Canvas that is paused, a 503 (UNKNOWN, and the circuit breaker opens), 429s that are retried,
a stream, a stream whose caller goes away (results logged for reconciliation), a tenant whose Braze
key the fake refuses (401), calls without or with an unknown
token, an invalid request, tenants reloads that fail, Redis (the shared budgets) stopped and
started again, a budget spent to the last call (paused,
then refused locally), and a shutdown whose not-ready delay Prometheus scrapes. Each kind of
traffic runs twice, with a scrape between, because a counter's first sample gives rate()
nothing.

Then every expression of deploy/grafana/canvas-gateway.json and deploy/prometheus/alerts.yml
must return data over the test's window, every metric they name must be in the gateway's
/metrics, and no label value may hold a token or a Braze key.

Needs the `prometheus` binary: `.ci/prometheus-install`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import prometheus_server
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from fake_braze import FakeBrazeConfig, Fault
from google.rpc import code_pb2
from servers import RedisServer, redis_server
from support import KEYS, TOKENS, Harness, WallClock

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "canvas-gateway.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

HOURLY_LIMIT = 17
"""acme's Braze budget: a keyed send makes 1 call, two rounds of traffic 14, the last step spends
the rest."""
INACTIVE_CANVAS = "canvas-paused-in-braze"
UNKNOWN_TOKEN = "token-nobody-0000"
SHUTDOWN_DELAY = 3.0
"""Seconds the gateway reports not ready before it stops: Prometheus scrapes it 2 or 3 times."""
TEST_SECONDS = 60.0
"""A bound on the whole test; it takes about 14 s."""
SECRETS = (*TOKENS.values(), *KEYS.values(), UNKNOWN_TOKEN)
RATE_INTERVAL = "1m"
"""What Grafana's $__rate_interval is here; the dashboard's own variables take their "All" value."""
METRIC_NAME = re.compile(r"\b(?:canvas_gateway|grpc_server)_[a-zA-Z0-9_]+")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def next_hour_clock() -> Callable[[], float]:
    """The fake Braze's clock: it starts at the next clock hour and runs in real time, so its
    hourly budget cannot roll over during the test and its reset is an hour or more away."""
    clock = WallClock()
    clock.skip_to(3600)
    return clock


@pytest.fixture
def fake_config() -> FakeBrazeConfig:
    # globex's key is not among the fake's keys: each of its calls is answered 401.
    return FakeBrazeConfig(
        api_keys=frozenset({KEYS["acme"]}),
        hourly_limit=HOURLY_LIMIT,
        paused_canvases=frozenset({INACTIVE_CANVAS}),
        clock=next_hour_clock(),
    )


BREAKER_COOLDOWN = 1.5
"""One failed call opens the breaker for this long: a scrape (every second) sees it open."""


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with redis_server() as server:
        yield server


@pytest.fixture
def settings_overrides(redis: RedisServer) -> dict[str, Any]:
    return {
        "redis_url": redis.url,  # shared budgets; an outage in each round (fail open)
        "shutdown_delay_seconds": SHUTDOWN_DELAY,
        "breaker_failures": 1,
        "breaker_cooldown_seconds": BREAKER_COOLDOWN,
    }


def unary(count: int, canvas_id: str = "canvas-1") -> pb.SendRequest:
    recipients = [pb.Recipient(external_user_id=f"user-{i}") for i in range(count)]
    return pb.SendRequest(trigger=pb.CanvasTrigger(canvas_id=canvas_id, recipients=recipients))


async def chunks(count: int, per_chunk: int) -> AsyncIterator[pb.SendStreamRequest]:
    yield pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="canvas-1")))
    for start in range(0, count, per_chunk):
        recipients = [pb.Recipient(external_user_id=f"user-{i}") for i in range(start, start + per_chunk)]
        yield pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=recipients))


async def refused(
    h: Harness, request: pb.SendRequest, metadata: tuple[tuple[str, str], ...]
) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.stub.Send(request, metadata=metadata, timeout=10)
    code: grpc.StatusCode = caught.value.code()
    return code


async def one_round(h: Harness, redis: RedisServer, scraped: Callable[[], Awaitable[None]]) -> None:
    """Each kind of traffic once. acme makes 7 calls that count against its budget."""
    acme = h.auth("acme")
    reply = await h.stub.Send(unary(60), metadata=acme, timeout=10)  # 2 calls
    assert reply.summary.recipients_sent == 60

    reply = await h.stub.Send(unary(10, INACTIVE_CANVAS), metadata=acme, timeout=10)  # 1 call
    assert reply.results[0].braze.notice

    h.fake.faults.script([Fault.status(503)])  # faults use no budget
    reply = await h.stub.Send(unary(10), metadata=acme, timeout=10)
    assert reply.results[0].outcome == pb.OUTCOME_UNKNOWN
    await asyncio.sleep(BREAKER_COOLDOWN + 0.1)  # the 503 opened the breaker; the next call probes

    h.fake.faults.script([Fault.status(429), Fault.status(429)])
    reply = await h.stub.Send(unary(10), metadata=acme, timeout=10)  # 1 call
    assert reply.results[0].outcome == pb.OUTCOME_SENT and reply.results[0].attempts == 3

    sent = 0
    async for response in h.stub.SendStream(chunks(120, 40), metadata=acme, timeout=10):  # 3 calls
        if response.HasField("summary"):
            sent = response.summary.recipients_sent
    assert sent == 120

    reply = await h.stub.Send(unary(10), metadata=h.auth("globex"), timeout=10)
    assert reply.results[0].braze.http_status == 401

    assert await refused(h, unary(1), ()) == grpc.StatusCode.UNAUTHENTICATED
    unknown = (("authorization", f"Bearer {UNKNOWN_TOKEN}"),)
    assert await refused(h, unary(1), unknown) == grpc.StatusCode.UNAUTHENTICATED
    assert await refused(h, unary(3, canvas_id=""), acme) == grpc.StatusCode.INVALID_ARGUMENT

    await cut_off_stream(h)

    tenants_file = Path(h.gateway.settings.tenants.file)
    good = tenants_file.read_text()
    tenants_file.write_text("broken [")
    h.gateway.reload_tenants()  # fails, keeps the tenants
    tenants_file.write_text(good)

    await redis.stop()  # budgets fall back to the process's own (fail open), and say so
    refused_key = await h.stub.Send(unary(2), metadata=h.auth("globex"), timeout=10)  # not acme's budget
    assert refused_key.results[0].braze.http_status == 401
    await scraped()  # a scrape sees the fallback (a 1 s outage fell between scrapes under load)
    await redis.start()


async def cut_off_stream(h: Harness) -> None:
    """initech's caller reads one result of a long stream, then goes away: the results waiting for
    it are logged at ERROR for reconciliation, and counted. (initech's key is refused: 401s, which
    spend no budget of acme's.)"""
    registry = h.gateway.registry

    def level(name: str) -> float:
        return registry.get_sample_value(name, {"tenant": "initech"}) or 0.0

    call = h.stub.SendStream(chunks(100_000, 1000), metadata=h.auth("initech"), timeout=10)
    assert isinstance(await call.read(), pb.SendStreamResponse)
    async with asyncio.timeout(10):
        while level("canvas_gateway_results_buffered") == 0:
            await asyncio.sleep(0.01)
        call.cancel()
        while level("canvas_gateway_streams_open") > 0:
            await asyncio.sleep(0.01)


async def send_and_replay(h: Harness) -> None:
    """A keyed send and its repeat (replayed: no call). Once, before Redis is restarted, and before
    the rounds: its counters then live through every scrape after it."""
    request = unary(10)
    request.options.idempotency_key = "prometheus-replays-1"
    reply = await h.stub.Send(request, metadata=h.auth("acme"), timeout=10)  # 1 call
    assert not reply.results[0].replayed
    again = await h.stub.Send(request, metadata=h.auth("acme"), timeout=10)
    assert again.results[0].replayed


async def spend_the_budget(h: Harness) -> None:
    """acme's last calls leave remaining 0: the tenant pauses until the reset, its batch after
    the last is refused (by Braze's 429 or locally), and a later Send is refused locally."""
    reply = await h.stub.Send(unary(150), metadata=h.auth("acme"), timeout=10)
    assert reply.summary.recipients_sent == 100
    assert {r.code for r in reply.results if r.outcome != pb.OUTCOME_SENT} == {code_pb2.RESOURCE_EXHAUSTED}


async def refused_locally(h: Harness) -> None:
    reply = await h.stub.Send(unary(10), metadata=h.auth("acme"), timeout=10)
    assert reply.results[0].attempts == 0
    assert reply.results[0].code == code_pb2.RESOURCE_EXHAUSTED


async def at_its_ceiling(h: Harness) -> None:
    """initech moves to workspace `shop` on acme's key with `ceiling = 1`: its one call (429: the
    key's hour is spent) is the gateway's whole ceiling of shop's window."""
    tenants_file = Path(h.gateway.settings.tenants.file)
    text = (
        tenants_file.read_text()
        .replace("[tenants.initech]\n", '[tenants.initech]\nworkspace = "shop"\n')
        .replace(f'braze_api_key = "{KEYS["initech"]}"', f'braze_api_key = "{KEYS["acme"]}"')
    )
    tenants_file.write_text(f"[workspaces.shop]\nceiling = 1\n\n{text}")
    h.gateway.reload_tenants()
    reply = await h.stub.Send(unary(1), metadata=h.auth("initech"), timeout=10)
    assert reply.results[0].attempts == 1 and reply.results[0].braze.http_status == 429


def dashboard_expressions() -> list[str]:
    """Every query of the dashboard, its variables (instance, worker, tenant) set to "All"."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {"__rate_interval": RATE_INTERVAL}
    variables |= {v["name"]: v["allValue"] for v in dashboard["templating"]["list"] if v.get("includeAll")}
    panels = list(dashboard["panels"])
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", ()))  # panels inside collapsed rows
    found = []
    for panel in panels:
        for target in panel.get("targets", ()):
            expr = target["expr"]
            for variable, value in sorted(variables.items(), key=lambda item: -len(item[0])):
                expr = expr.replace(f"${{{variable}}}", value).replace(f"${variable}", value)
            assert "$" not in expr, f"panel {panel['title']!r}: unknown variable in {target['expr']}"
            found.append(expr)
    return found


async def exposition(h: Harness) -> str:
    url = f"http://127.0.0.1:{h.gateway.admin_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as reply:
        assert reply.status == 200
        return await reply.text()


def samples(text: str) -> tuple[set[str], set[str]]:
    """The sample names and the label values of a text exposition."""
    names: set[str] = set()
    values: set[str] = set()
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match is None:
            continue
        names.add(match.group(1))
        values.update(value for _, value in LABEL.findall(match.group(2) or ""))
    return names, values


async def data_problem(prometheus: prometheus_server.Prometheus, expr: str, start: float, end: float) -> str:
    """Why `expr` has no data from `start` to `end`, or "" when it has."""
    try:
        series = await prometheus.query_range(expr, start, end)
    except AssertionError as error:  # Prometheus refused the query
        return str(error)
    if not series:
        return "no series"
    return (
        "" if prometheus_server.has_data(series) else f"only NaN or infinite values in {len(series)} series"
    )


async def test_every_dashboard_and_alert_expression_has_data(
    harness: Harness, redis: RedisServer, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{harness.gateway.admin_port}"
    async with (
        asyncio.timeout(TEST_SECONDS),
        prometheus_server.running(tmp_path / "prometheus", target, [ALERTS]) as prometheus,
    ):
        began = time.time()
        await prometheus.wait_for('up{job="canvas-gateway"} == 1', "a scrape of the gateway")
        await send_and_replay(harness)
        for _ in range(2):
            await one_round(harness, redis, lambda: prometheus.wait_for_scrape_after(time.time()))
            await prometheus.wait_for_scrape_after(time.time())
        await spend_the_budget(harness)
        await prometheus.wait_for('canvas_gateway_tenant_paused{tenant="acme"} == 1', "acme paused")
        await refused_locally(harness)
        harness.gateway.reload_tenants()  # the file is good again
        await at_its_ceiling(harness)
        text = await exposition(harness)
        await prometheus.wait_for_scrape_after(time.time())

        stopping = asyncio.create_task(harness.gateway.stop(grace=1))  # not ready for SHUTDOWN_DELAY s
        await prometheus.wait_for("canvas_gateway_ready == 0", "a not-ready scrape", SHUTDOWN_DELAY + 2)
        await stopping
        await prometheus.wait_for('up{job="canvas-gateway"} == 0', "a failed scrape of the stopped gateway")
        ended = time.time() + 1  # a step after the last scrape: query_range steps start at `began`

        rules = await prometheus.rules()
        in_file = re.findall(r"^\s*- alert: (\S+)", ALERTS.read_text(), re.MULTILINE)
        assert sorted(rule["name"] for rule in rules) == sorted(in_file), (
            "Prometheus did not load every alert"
        )
        assert all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]

        expressions = {f"dashboard: {expr}": expr for expr in dashboard_expressions()}
        expressions |= {f"alert {rule['name']}: {rule['query']}": rule["query"] for rule in rules}
        failing = [
            f"{label}\n    {problem}"
            for label, expr in expressions.items()
            if (problem := await data_problem(prometheus, expr, began, ended))
        ]
        assert not failing, "expressions without data over the test's window:\n" + "\n".join(failing)

        # Alerts without a `for:` must also have fired through Prometheus's rule engine.
        fired = await prometheus.query_range('ALERTS{alertstate="firing"}', began, ended)
        firing = {(alert["metric"]["alertname"], alert["metric"].get("tenant", "")) for alert in fired}
        assert {rule["name"] for rule in rules if rule["duration"] == 0} <= {name for name, _ in firing}
        assert {
            ("CanvasGatewayUnknownOutcomes", "acme"),
            ("CanvasGatewayBrazeUnauthorized", "globex"),
        } <= firing

    names, values = samples(text)
    used = {name for expr in expressions.values() for name in METRIC_NAME.findall(expr)}
    assert used - names == set(), f"metrics used by the dashboard or alerts but not exposed: {used - names}"
    leaked = sorted({secret for secret in SECRETS for value in values if secret in value})
    assert not leaked, f"label values hold secrets: {leaked}"
    assert not [secret for secret in SECRETS if secret in text], "the exposition holds a token or a Braze key"
