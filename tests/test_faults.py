"""Fault injection end to end: under random 5xx, 429s and dropped connections, every recipient
gets exactly one result that tells the truth about what reached Braze, and nobody is sent twice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator

import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from fake_braze import FakeBrazeConfig
from support import KEYS, Harness

TOTAL = 5_000
FAULTY = FakeBrazeConfig(
    api_keys=frozenset(KEYS.values()),
    error_rates={503: 0.08, 500: 0.04, 429: 0.15},
    reset_rate=0.05,
    seed=20261126,
)


async def requests() -> AsyncIterator[pb.SendStreamRequest]:
    yield pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c-faults")))
    for start in range(0, TOTAL, 250):
        recipients = [pb.Recipient(external_user_id=f"u{i}") for i in range(start, start + 250)]
        yield pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=recipients))


@pytest.mark.parametrize("fake_config", [FAULTY])
async def test_every_recipient_has_one_truthful_result_under_faults(harness: Harness) -> None:
    results: list[pb.BatchResult] = []
    summary = None
    async for response in harness.stub.SendStream(requests(), metadata=harness.auth(), timeout=120):
        if response.HasField("result"):
            results.append(response.result)
        elif response.HasField("summary"):  # a message with no part is skipped
            summary = response.summary

    positions = sorted(p for r in results for p in r.positions)
    assert positions == list(range(TOTAL)), "every recipient exactly once"

    calls_by_batch: dict[tuple[str, ...], list[int]] = defaultdict(list)
    sent_to: dict[str, int] = defaultdict(int)
    for call in harness.fake.calls:
        ids = tuple(r["external_user_id"] for r in call.body["recipients"])
        calls_by_batch[ids].append(call.status)
        if call.status == 201:
            for user in ids:
                sent_to[user] += 1
    assert max(sent_to.values()) == 1, "nobody is sent the Canvas twice"

    outcomes: dict[int, int] = defaultdict(int)
    for result in results:
        statuses = calls_by_batch[tuple(f"u{p}" for p in result.positions)]
        assert result.attempts == len(statuses)
        assert all(s == 429 for s in statuses[:-1]), "only 429s are retried"
        outcomes[result.outcome] += 1
        if result.outcome == pb.OUTCOME_SENT:
            assert statuses[-1] == 201
            assert result.braze.dispatch_id
        elif result.outcome == pb.OUTCOME_UNKNOWN:
            assert statuses[-1] in (0, 500, 503), "UNKNOWN only where the call may have been processed"
            assert not result.retryable
        else:
            assert result.outcome == pb.OUTCOME_REJECTED
            assert statuses == [429] * len(statuses)
            assert result.retryable
            assert result.attempts == harness.gateway.settings.retry.max_attempts
    assert outcomes[pb.OUTCOME_SENT] > 0
    assert outcomes[pb.OUTCOME_UNKNOWN] > 0, "the seed should inject ambiguous failures"
    assert sum(sent_to.values()) == harness.fake.recipients_sent

    assert summary is not None
    by_outcome: dict[int, int] = defaultdict(int)
    for result in results:
        by_outcome[result.outcome] += len(result.positions)
    assert summary.recipients_sent == by_outcome[pb.OUTCOME_SENT] == harness.fake.recipients_sent
    assert summary.recipients_unknown == by_outcome[pb.OUTCOME_UNKNOWN]
    assert summary.recipients_rejected == by_outcome[pb.OUTCOME_REJECTED]
