"""deploy/grafana/canvas-gateway.json read as Grafana would, without Grafana.

Grafana publishes its dashboard model as TypeScript types (npm `@grafana/schema`), not as a JSON
Schema: deploy/grafana/check/check.sh has tsc check the file against that model (`make
grafana-check`; here too, with a file it must refuse). The rest holds what the model cannot: ids
and grid positions; every metric a query names exists in the gateway's registry; every selector
is scoped to the `instance` and `worker` selectors; each rate is shown in the unit of what it
counts; each state gauge's values are named; each description names the metrics its queries use,
and no other. tests/test_prometheus.py then runs every query against a real Prometheus and
requires data.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from canvas_gateway_server.breaker import State
from canvas_gateway_server.metrics import PrometheusMetrics
from prometheus_client import CollectorRegistry

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "canvas-gateway.json"
CHECK = DASHBOARD.parent / "check"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SELECTOR = re.compile(r"\b((?:canvas_gateway|grpc_server)_[a-zA-Z0-9_]+)(?:\{([^}]*)\})?")
SELECTOR_IN_TEXT = re.compile(r"\b(?:canvas_gateway|grpc_server)_[a-zA-Z0-9_]+")
RATE = re.compile(r"\b(?:rate|increase)\(((?:canvas_gateway|grpc_server)_[a-zA-Z0-9_]+)")
SCOPE = ('instance=~"$instance"', 'worker=~"$worker"')
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

RECIPIENTS, BATCHES = "count:recipients/s", "count:batches/s"
RATE_UNITS = {
    "canvas_gateway_recipients_total": RECIPIENTS,
    "canvas_gateway_replayed_recipients_total": RECIPIENTS,
    "canvas_gateway_batches_total": BATCHES,
    "canvas_gateway_idempotency_total": BATCHES,
    "canvas_gateway_braze_requests_total": "reqps",
    "canvas_gateway_retries_total": "reqps",
    "canvas_gateway_auth_failures_total": "reqps",
    "grpc_server_handled_total": "reqps",
    "grpc_server_started_total": "reqps",
    "grpc_server_msg_received_total": "count:messages/s",
    "grpc_server_msg_sent_total": "count:messages/s",
    "canvas_gateway_validation_failures_total": "count:violations/s",
    "canvas_gateway_rate_limit_wait_seconds_total": "count:s/s",
    "canvas_gateway_shared_store_failures_total": "ops",
    "canvas_gateway_tenant_reloads_total": "count:reloads",
    "canvas_gateway_shared_store_lost_total": "count:losses",
    "canvas_gateway_braze_request_duration_seconds_bucket": "s",
    "grpc_server_handling_seconds_bucket": "s",
    "canvas_gateway_event_loop_lag_seconds_bucket": "s",
}
"""The unit of each counter a query takes the rate (or increase) of: `reqps` only for calls."""
STATES = {
    "canvas_gateway_braze_breaker_state": {state.value for state in State},
    "canvas_gateway_shared_store_fallback": {0, 1},
    "canvas_gateway_idempotency_keys_refused": {0, 1},
    "canvas_gateway_ready": {0, 1},
}
"""Gauges whose values are states: every value must be named by a value mapping."""


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels() -> list[dict[str, Any]]:
    """Every panel, rows and panels inside collapsed rows included."""
    panels = list(dashboard()["panels"])
    for panel in list(panels):
        panels.extend(panel.get("panels", ()))
    return panels


def query_panels() -> list[dict[str, Any]]:
    return [panel for panel in all_panels() if panel["type"] != "row"]


def exposed_names() -> set[str]:
    """The sample names a gateway's registry exposes."""
    registry = CollectorRegistry()
    PrometheusMetrics(registry, version="test", git_commit="test")
    suffixes = {"counter": ("_total",), "info": ("_info",), "histogram": HISTOGRAM_SUFFIXES}
    return {
        family.name + suffix for family in registry.collect() for suffix in suffixes.get(family.type, ("",))
    }


def unit(panel: dict[str, Any], ref_id: str) -> str:
    """The unit Grafana shows a query's series in: an override for its refId, else the default."""
    found: str = panel["fieldConfig"]["defaults"].get("unit", "")
    for override in panel["fieldConfig"].get("overrides", ()):
        if override["matcher"] == {"id": "byFrameRefID", "options": ref_id}:
            for prop in override["properties"]:
                if prop["id"] == "unit":
                    found = prop["value"]
    return found


def base_name(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_panels_have_unique_ids_places_on_the_grid_and_the_datasource_variable() -> None:
    panels = all_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"ids used twice: {sorted(i for i in ids if ids.count(i) > 1)}"
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in "hwxy"), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]
    for panel in query_panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip(), panel["title"]


def test_every_query_names_metrics_the_gateway_exposes() -> None:
    exposed = exposed_names()
    for panel in query_panels():
        for target in panel["targets"]:
            names = {name for name, _ in SELECTOR.findall(target["expr"])}
            assert names, f"{panel['title']!r}: no gateway metric in {target['expr']}"
            assert names <= exposed, f"{panel['title']!r}: not in the registry: {names - exposed}"


def test_every_selector_is_scoped_to_the_selected_instances_and_workers() -> None:
    variables = {variable["name"]: variable for variable in dashboard()["templating"]["list"]}
    assert {"instance", "worker", "tenant"} <= variables.keys()
    # A gateway with one process has no worker label: "All" must match its empty value.
    assert re.fullmatch(variables["worker"]["allValue"], "")
    for name in ("worker", "tenant"):
        assert '{instance=~"$instance"' in variables[name]["query"]["query"], name
    for panel in query_panels():
        for target in panel["targets"]:
            for name, matchers in SELECTOR.findall(target["expr"]):
                missing = [scope for scope in SCOPE if scope not in matchers.split(",")]
                assert not missing, f"{panel['title']!r}: {name} is not scoped by {missing}"


def test_rates_are_shown_in_the_unit_of_what_they_count() -> None:
    for panel in query_panels():
        for target in panel["targets"]:
            for name in RATE.findall(target["expr"]):
                assert name in RATE_UNITS, f"{panel['title']!r}: choose a unit for rates of {name}"
                shown = unit(panel, target["refId"])
                assert shown == RATE_UNITS[name], f"{panel['title']!r} {target['refId']}: {shown}"


def test_every_value_of_a_state_gauge_is_named() -> None:
    charted = set()
    for panel in query_panels():
        names = {name for target in panel["targets"] for name, _ in SELECTOR.findall(target["expr"])}
        for name in names & STATES.keys():
            charted.add(name)
            mapped = {
                int(value)
                for mapping in panel["fieldConfig"]["defaults"].get("mappings", ())
                if mapping["type"] == "value"
                for value, shown in mapping["options"].items()
                if shown.get("text")
            }
            assert STATES[name] <= mapped, f"{panel['title']!r}: {name} values {STATES[name] - mapped}"
    assert charted == STATES.keys(), f"not charted: {STATES.keys() - charted}"


def test_the_breaker_and_the_shared_stores_are_state_timelines() -> None:
    for name in ("canvas_gateway_braze_breaker_state", "canvas_gateway_shared_store_fallback"):
        types = {
            panel["type"]
            for panel in query_panels()
            if any(name in target["expr"] for target in panel["targets"])
        }
        assert types == {"state-timeline"}, name


def test_descriptions_name_the_metrics_their_queries_use_and_no_other() -> None:
    exposed = {base_name(name) for name in exposed_names()}
    for panel in query_panels():
        used = {
            base_name(name) for target in panel["targets"] for name, _ in SELECTOR.findall(target["expr"])
        }
        described = set(SELECTOR_IN_TEXT.findall(panel.get("description", ""))) & exposed
        assert described == used, (
            f"{panel['title']!r}: described only {described - used}, queried only {used - described}"
        )


def grafana_model_check(dashboard: Path) -> subprocess.CompletedProcess[str]:
    if not (CHECK / "node_modules" / ".package-lock.json").exists():
        if os.environ.get("REQUIRE_CLIENT_BUILDS") == "1":
            pytest.fail("Grafana's dashboard model is not installed: run `make grafana-check`")
        pytest.skip("Grafana's dashboard model is not installed (make grafana-check)")
    return subprocess.run(
        [CHECK / "check.sh", dashboard], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_dashboard_fits_grafanas_published_model() -> None:
    checked = grafana_model_check(DASHBOARD)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize(
    ("correct", "mistake", "said"),
    [
        ('"gridPos"', '"gridPosition"', "'\"gridPosition\"' does not exist"),
        ('"value": 1\n', '"value": "1"\n', "Type 'string' is not assignable to type 'number'"),
        ('"mode": "thresholds"', '"mode": "rainbow"', "Type '\"rainbow\"' is not assignable"),
    ],
)
def test_the_model_check_refuses_a_mistake(correct: str, mistake: str, said: str, tmp_path: Path) -> None:
    text = DASHBOARD.read_text()
    assert correct in text
    (tmp_path / "broken.json").write_text(text.replace(correct, mistake, 1))
    refused = grafana_model_check(tmp_path / "broken.json")
    assert refused.returncode == 1 and said in refused.stdout, refused.stdout + refused.stderr
