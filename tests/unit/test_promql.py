"""Escaping and validation of values placed in PromQL; template parsing; histogram maths;
envoy matching by index. Answer sharing is tested against the real Prometheus in
tests/integration/test_analysis.py."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from canaryd.core.analysis import AnalysisTarget, BackendStats
from canaryd.errors import MetricsError
from canaryd.metrics import promql
from canaryd.metrics.base import histogram_quantile
from canaryd.metrics.custom import parse_templates
from canaryd.metrics.envoy import EnvoyIndex, EnvoySignal, EnvoyTarget, cluster_pattern, pattern_bounds_service
from canaryd.metrics.prometheus import iter_samples
from canaryd.settings import PrometheusSettings
from tests.specs import analysis_spec


@pytest.mark.parametrize(
    "value",
    ['a"}', "a\\", "A", "a b", "a|b", "a.*", "", "-a", "a{b}", "x`y", "a\nb", "a" * 64, None, 3],
)
def test_safe_label_refuses(value: object) -> None:
    with pytest.raises(MetricsError, match="canary"):
        promql.safe_label("canary", value)


def test_safe_values_pass() -> None:
    assert promql.safe_label("x", "whoami-v2") == "whoami-v2"
    assert promql.safe_name("route", "api.v1-route") == "api.v1-route"
    assert promql.safe_port("port", 8080) == "8080"
    for bad in (0, 70000, True, "80"):
        with pytest.raises(MetricsError):
            promql.safe_port("port", bad)


@example("0\n")  # found by hypothesis: a regex `$` also matches before a trailing newline
@given(st.text())
def test_accepted_values_cannot_escape_a_string_or_selector(value: str) -> None:
    try:
        promql.safe_name("v", value)
    except MetricsError:
        return
    assert not set(value) & set("\"'`\\{}()[]|,=!~ \n")


@given(st.text())
def test_string_literal_round_trips(value: str) -> None:
    lit = promql.string_literal(value)
    body = lit[1:-1]
    # No unescaped quote inside the literal.
    assert not re.search(r'(?<!\\)(\\\\)*"', body)
    decoded = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), body, flags=re.S)
    assert decoded == value


def test_regex_helpers() -> None:
    assert promql.regex_escape("a.b*c") == r"a\.b\*c"
    assert promql.regex_union(["a", "b", "a"]) == "(?:a)|(?:b)"
    with pytest.raises(MetricsError):
        promql.regex_union([])


def test_duration() -> None:
    assert promql.duration(60) == "60s"
    assert promql.duration(7.5) == "7500ms"
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(MetricsError):
            promql.duration(bad)


def test_render() -> None:
    values = {"namespace": "prod", "app_id": None}
    assert promql.render('x{namespace="{namespace}"}', values, where="t") == 'x{namespace="prod"}'
    with pytest.raises(MetricsError, match=r"app_id.*no value"):
        promql.render("{app_id}", values, where="t")
    with pytest.raises(MetricsError, match="unknown variable"):
        promql.render("{nope}", values, where="t")


def test_default_cluster_pattern_matches_cilium_names() -> None:
    p = cluster_pattern(
        PrometheusSettings().envoy_cluster_pattern,
        namespace="prod",
        service="whoami-v2",
        port=80,
        parent="whoami",
    )
    rx = re.compile(p)
    assert rx.fullmatch("prod/whoami/prod_whoami-v2_80")
    assert rx.fullmatch("prod/whoami/prod:whoami-v2:80")
    assert not rx.fullmatch("prod/whoami/prod_whoami-v2-old_80")
    assert not rx.fullmatch("prod/whoami/prod_whoami_80")
    assert not rx.fullmatch("other/whoami/other_whoami-v2_80")


def test_templates_validation() -> None:
    ok = parse_templates({"templates": {"t": {"requests": 'sum(x{a="{backend}"})', "errors": "0"}}}, source="f")
    assert ok["t"].latency_ms is None
    with pytest.raises(MetricsError, match="unknown variable"):
        parse_templates({"templates": {"t": {"requests": "{foo}", "errors": "0"}}}, source="f")
    with pytest.raises(MetricsError, match="'errors' query is required"):
        parse_templates({"templates": {"t": {"requests": "1"}}}, source="f")
    with pytest.raises(MetricsError, match="templates"):
        parse_templates([], source="f")


def test_histogram_quantile() -> None:
    inf = math.inf
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {10.0: 0.0, inf: 0.0}) is None
    # All in (250, 500]: Prometheus interpolates linearly inside the bucket.
    assert histogram_quantile(0.99, {250.0: 0.0, 500.0: 10.0, inf: 10.0}) == pytest.approx(497.5)
    assert histogram_quantile(0.5, {10.0: 10.0, inf: 10.0}) == pytest.approx(5.0)
    # Beyond the last finite bucket: its upper bound.
    assert histogram_quantile(0.99, {10.0: 0.0, inf: 10.0}) == 10.0


# --- envoy matching by index (pure) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "bounded"),
    [
        (PrometheusSettings().envoy_cluster_pattern, True),
        ("{namespace}/{parent}/{namespace}_{service}_{port}", True),
        (r"outbound\|{port}\|\|{service}\.{namespace}\.svc\.cluster\.local", True),
        ("^{service}$", True),
        ("{service}[:_]+{port}", True),
        (".*{service}_{port}", False),  # the run may start earlier
        ("{namespace}-{service}_{port}", False),
        (r"{namespace}_{service}\-{port}", False),
        ("{namespace}_{service}_?{port}", False),  # the separator is optional
        ("{namespace}_{service}[:_]*{port}", False),
        ("{namespace}_(?:x|{service})_{port}", False),
        ("{namespace}_[^a]{service}_{port}", False),
        (".*{namespace}.*", False),  # no {service}: every name is a candidate
    ],
)
def test_pattern_bounds_service(template: str, bounded: bool) -> None:
    assert pattern_bounds_service(template) is bounded


def _names(namespaces: list[str], n: int) -> list[str]:
    out = []
    for ns in namespaces:
        for i in range(n):
            for backend in (f"svc{i}-v1", f"svc{i}-v2", f"svc{i}-v1-old", f"x-svc{i}-v1"):
                sep = ":" if i % 2 else "_"
                out.append(f"{ns}/svc{i}/{ns}{sep}{backend}{sep}80")
                out.append(f"{ns}/svc{i}/{ns}{sep}{backend}{sep}8080")
            out.append(f"outbound|80||svc{i}-v1.{ns}.svc.cluster.local")
    return out


@pytest.mark.parametrize(
    "template",
    [
        PrometheusSettings().envoy_cluster_pattern,
        ".*{service}[:_]{port}",  # not bounded: substring pre-filter
        r"outbound\|{port}\|\|{service}\.{namespace}\.svc\.cluster\.local",
        ".*/{parent}/.*",  # no {service}: scan every name
    ],
)
def test_envoy_match_by_index_equals_brute_force(template: str) -> None:
    signal = EnvoySignal(PrometheusSettings(envoy_cluster_pattern=template))
    names = _names(["prod", "prod-eu", "svc1"], 12)
    totals = {n: [float(i + 1), float(i % 3)] for i, n in enumerate(names)}
    buckets = {n: {10.0: float(i), math.inf: float(i + 1)} for i, n in enumerate(names)}
    index = EnvoyIndex(totals, buckets)
    targets = [
        AnalysisTarget(
            namespace=ns,
            route=f"svc{i}",
            service=f"svc{i}",
            port=80,
            stable=f"svc{i}-v1",
            canary=f"svc{i}-v2",
            spec=SPEC,
        )
        for ns in ("prod", "prod-eu", "svc1", "absent")
        for i in range(14)
    ]
    items = [signal.prepare(t) for t in targets]
    got = signal.match(index, items)

    def brute(pattern: str) -> BackendStats:
        matched = [n for n in names if re.fullmatch(pattern, n)]
        merged: dict[float, float] = {}
        for n in matched:
            for le, v in buckets[n].items():
                merged[le] = merged.get(le, 0.0) + v
        return BackendStats(
            sum(totals[n][0] for n in matched),
            sum(totals[n][1] for n in matched),
            histogram_quantile(0.99, merged),
        )

    assert sum(bool(o.stable and o.stable.requests > 0) for o in got) >= 12  # the test matches something
    for item, obs in zip(items, got, strict=True):
        assert obs.canary == brute(item.canary)
        assert obs.stable == brute(item.stable)


SPEC = analysis_spec(window_s=10.0, min_requests=1)


def test_malformed_answers_are_refused() -> None:
    with pytest.raises(MetricsError, match="unexpected result type"):
        list(iter_samples({"x": 1}, "http://p"))
    for bad in ({"value": [0, "1"]}, {"metric": [], "value": [0, "1"]}, {"metric": {}, "value": [0, "x"]}):
        with pytest.raises(MetricsError, match="malformed sample"):
            list(iter_samples([bad], "http://p"))
    assert list(iter_samples([{"metric": {"a": "b"}, "value": [0, "NaN"]}], "http://p")) == []


@pytest.mark.parametrize(
    ("name", "matches"),
    [
        ("default/whoami/default_whoami-v2_80", True),  # Cilium GAMMA, ':' read as '_'
        ("default/whoami/default:whoami-v2:80", True),
        ("default_whoami_default_whoami-v2_80", True),
        ("default/cilium-gateway-gw/default_whoami-v2_80", False),  # the same backend, north-south
        ("default/whoami/default_whoami-v2_80/ext-authz", False),
        ("default/whoami/default_whoami-v2_8080", False),
        ("shop/whoami/shop_whoami-v2_80", False),
        ("default/whoami/default_whoami-v20_80", False),
        ("xdefault/whoami/default_whoami-v2_80", False),
    ],
)
def test_default_cluster_pattern_is_pinned_to_the_gamma_parent(name: str, matches: bool) -> None:
    from canaryd.metrics.envoy import cluster_pattern

    rx = cluster_pattern(
        PrometheusSettings().envoy_cluster_pattern, namespace="default", service="whoami-v2", port=80, parent="whoami"
    )
    assert bool(re.fullmatch(rx, name)) is matches


def test_envoy_fetches_buckets_only_for_routes_that_judge_latency() -> None:
    from dataclasses import replace

    signal = EnvoySignal(PrometheusSettings())

    def item(ns: str, **spec: object) -> EnvoyTarget:
        t = AnalysisTarget(ns, "r", "r", 80, "r-v1", "r-v2", replace(SPEC, **spec))  # type: ignore[arg-type]
        return signal.prepare(t)

    shown, judged = item("a"), item("b", latency_max_ms=100.0)
    scope = signal.scope([shown])
    assert "a" in scope and not any(x.startswith("\0buckets") for x in scope)
    assert "\0buckets" in signal.scope([shown, judged])
    # The markers never reach the selector: it names namespaces only.
    assert signal._selector(signal.scope([shown, judged])) == 'envoy_cluster_name=~".*(?:a|b).*"'

    # Shown from Prometheus' per-cluster quantile (the largest of a backend's clusters); no slow count.
    names = ["a/r/a_r-v1_80", "a/r/a_r-v2_80", "b/r/b_r-v1_80", "b/r/b_r-v2_80"]
    index = EnvoyIndex(
        {n: [100.0, 0.0, 0.0] for n in names},
        {n: {100.0: 40.0, 500.0: 100.0, math.inf: 100.0} for n in names[2:]},
        {SPEC.latency_quantile: {names[0]: 20.0, names[1]: 420.0}},
    )
    (a_obs, b_obs) = signal.match(index, [shown, judged])
    assert a_obs.canary is not None and a_obs.canary.latency_ms == 420.0 and a_obs.canary.slow is None
    assert b_obs.canary is not None and b_obs.canary.slow == pytest.approx(60.0)  # from the buckets
