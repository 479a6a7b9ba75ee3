"""The demo's own servers on real 127.0.0.1 sockets (whoami, loadgen), and the data plane's pure
routing table. The data plane against the apiserver is tests/integration/test_dataplane.py."""

from __future__ import annotations

import random
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from devkit.demo.dataplane import (
    DaprImitation,
    build_table,
    choose_backend,
    local_backend_objects,
)
from devkit.demo.loadgen import run_load
from devkit.demo.whoami import ErrorSchedule, Whoami, WhoamiConfig


async def test_whoami_answers_like_traefik_whoami() -> None:
    """traefik/whoami's bytes: LF lines about itself, then the request as Go's Request.Write
    writes it (CRLF, canonical header names sorted, default User-Agent, empty line)."""
    cfg = WhoamiConfig(name="v1", hostname="whoami-v1-abc", ips=("127.0.0.1", "10.244.0.5"))
    async with Whoami(cfg) as w, aiohttp.ClientSession(skip_auto_headers=["User-Agent"]) as s:
        headers = {"dapr-caller-app-id": "ingress", "Dapr-Callee-App-Id": "whoami", "Accept": "*/*"}
        async with s.get(w.url + "/some/path?x=1", headers=headers) as r:
            body = await r.read()
            assert r.status == 200
            assert r.headers["x-whoami-name"] == "v1"
            assert r.headers["content-type"] == "text/plain; charset=utf-8"
        about, _, wire = body.partition(b"RemoteAddr: 127.0.0.1:")
        assert about == b"Name: v1\nHostname: whoami-v1-abc\nIP: 127.0.0.1\nIP: 10.244.0.5\n"
        port, _, request = wire.partition(b"\n")
        assert port.isdigit()
        lines = request.decode().split("\r\n")
        assert lines[:3] == [
            "GET /some/path?x=1 HTTP/1.1",
            f"Host: 127.0.0.1:{w.port}",
            "User-Agent: Go-http-client/1.1",
        ]
        assert lines[-2:] == ["", ""]  # the empty line that ends the headers; no body
        names = [line.split(":")[0] for line in lines[3:-2]]
        assert names == sorted(names) and {"Accept", "Dapr-Callee-App-Id", "Dapr-Caller-App-Id"} <= set(names)
        assert "Dapr-Caller-App-Id: ingress" in lines
        async with s.post(w.url + "/api", data=b"x") as r:
            api = await r.json()
        assert api["name"] == "v1" and api["method"] == "POST" and api["host"] == f"127.0.0.1:{w.port}"
        assert api["hostname"] == "whoami-v1-abc" and api["ip"] == ["127.0.0.1", "10.244.0.5"]
        assert "Host" not in api["headers"] and api["headers"]["Content-Length"] == ["1"]
        async with s.get(w.url + "/health") as r:
            assert r.status == 200 and await r.read() == b""


def test_error_schedule_is_exact_and_spread() -> None:
    sched = ErrorSchedule(0.1)
    hits = [sched.next_is_error() for _ in range(1000)]
    assert sum(hits) == 100
    assert sum(hits[:10]) == 1  # evenly spread, not bunched
    assert sum(ErrorSchedule(0.0).next_is_error() for _ in range(100)) == 0
    assert sum(ErrorSchedule(1.0).next_is_error() for _ in range(100)) == 100
    with pytest.raises(ValueError):
        WhoamiConfig(name="x", error_ratio=1.5)


async def test_loadgen_counts_status_latency_and_timeline() -> None:
    cfg = WhoamiConfig(name="v3", error_ratio=0.25, latency_ms=20)
    async with Whoami(cfg) as w:
        res = await run_load(
            w.url + "/",
            rate=100,
            duration_s=2.0,
            concurrency=8,
            backend_header="x-whoami-name",
            timeline=True,
            keep_results=True,
        )
    assert res.sent == 200 and res.answered == 200 and res.errors == 0
    assert res.by_status == {"200": 150, "500": 50}
    assert res.by_backend == {"v3": 200}
    assert res.by_backend_status == {"v3": {"200": 150, "500": 50}}
    assert set(res.timeline) == {0, 1} and sum(sum(c.values()) for c in res.timeline.values()) == 200
    assert res.latency_ms_p50 is not None and res.latency_ms_p50 >= 20
    assert 1.9 <= res.elapsed_s < 4.0  # fixed rate, not as fast as possible
    assert res.share("v3", since=1.0) == 1.0


async def test_loadgen_counts_connection_errors_and_refuses_remote_targets() -> None:
    w = Whoami(WhoamiConfig(name="gone"))
    await w.start()
    url = w.url + "/"
    await w.stop()
    res = await run_load(url, rate=50, duration_s=0.2, timeout_s=1.0)
    assert res.sent == 10 and res.answered == 0 and res.errors == 10
    assert all(k.startswith("error:") for k in res.by_status)
    with pytest.raises(ValueError):
        await run_load("http://192.0.2.1/", rate=1, duration_s=1)


def _route(
    name: str, weights: dict[str, int], prefix: str | None = None, created: str = "2026-01-01T00:00:00Z"
) -> dict[str, Any]:
    rule: dict[str, Any] = {"backendRefs": [{"name": n, "port": 80, "weight": w} for n, w in weights.items()]}
    if prefix is not None:
        rule["matches"] = [{"path": {"type": "PathPrefix", "value": prefix}}]
    return {
        "metadata": {"name": name, "creationTimestamp": created, "annotations": {"canaryd.io/app-id": "who"}},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "whoami"}], "rules": [rule]},
    }


def test_build_table_resolves_local_endpoints_and_prefixes() -> None:
    svc1, slices1 = local_backend_objects("whoami-v1", [18081, 18082])
    svc2, slices2 = local_backend_objects("whoami-v2", [18090])
    foreign = {
        "metadata": {"name": "x", "labels": {"kubernetes.io/service-name": "whoami-v2"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 9}],
        "endpoints": [{"addresses": ["10.0.0.7"]}],
    }
    unready = {
        **slices2[0],
        "metadata": {**slices2[0]["metadata"], "name": "u"},
        "endpoints": [{"addresses": ["u.localhost"], "conditions": {"ready": False}}],
    }
    refused: set[str] = set()
    table = build_table(
        "ns",
        [
            _route("a", {"whoami-v1": 80, "whoami-v2": 20}),
            _route("b", {"whoami-v2": 1}, prefix="/api", created="2026-01-02T00:00:00Z"),
            {"metadata": {"name": "gw"}, "spec": {"parentRefs": [{"name": "web"}], "rules": []}},
        ],
        [svc1, svc2],
        [*slices1, *slices2, foreign, unready],
        refused=refused,
    )
    assert set(table.parents) == {"whoami"}
    pr = table.parents["whoami"]
    assert pr.app_id == "who" and pr.routes == ("a", "b")
    assert table.endpoints[("whoami-v1", 80)] == tuple(
        e for e in table.endpoints[("whoami-v1", 80)] if e.host == "127.0.0.1"
    )
    assert sorted(e.port for e in table.endpoints[("whoami-v1", 80)]) == [18081, 18082]
    assert [e.port for e in table.endpoints[("whoami-v2", 80)]] == [18090]
    assert refused == {"whoami-v2:10.0.0.7"}
    rule_api = pr.rule_for("/api/x")
    assert rule_api is not None and [b.service for b in rule_api.backends] == ["whoami-v2"]
    rule_root = pr.rule_for("/apix")  # element-wise prefix: /api does not match /apix
    assert rule_root is not None and rule_root.total_weight == 100
    assert rule_root.backends[0].cluster == "ns/whoami/ns_whoami-v1_80"


def test_weighted_choice_respects_zero_and_ratio() -> None:
    table = build_table("ns", [_route("a", {"v1": 3, "v2": 1, "v3": 0})], [], [])
    rule = table.parents["whoami"].rules[0]
    rng = random.Random(1)
    picks = [b.service for b in (choose_backend(rule, rng) for _ in range(4000)) if b]
    assert "v3" not in picks
    assert abs(picks.count("v2") / 4000 - 0.25) < 4 * (0.25 * 0.75 / 4000) ** 0.5
    zero = build_table("ns", [_route("a", {"v1": 0})], [], []).parents["whoami"].rules[0]
    assert choose_backend(zero, rng) is None


def test_dapr_imitation_names() -> None:
    """The imitated Dapr series (Envoy's exposition: tests/unit/test_envoy_exposition.py)."""
    stats = DaprImitation()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(stats)
    stats.record(caller="ingress", app_id="whoami", status=200, elapsed_ms=3.0)
    text = generate_latest(reg).decode()
    for line in (
        'dapr_runtime_service_invocation_req_sent_total{app_id="ingress",dst_app_id="whoami",type="unary"} 1.0',
        'dapr_runtime_service_invocation_res_recv_total{app_id="ingress",src_app_id="whoami",'
        'status="200",type="unary"} 1.0',
        'dapr_runtime_service_invocation_res_recv_latency_ms_count{app_id="ingress",'
        'src_app_id="whoami",status="200"} 1.0',
    ):
        assert line in text, line
    assert "_created" not in text
