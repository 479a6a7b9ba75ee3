"""Escaping and validation of values placed in PromQL; template parsing; histogram maths."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from canaryd.errors import MetricsError
from canaryd.metrics import promql
from canaryd.metrics.base import histogram_quantile
from canaryd.metrics.custom import parse_templates
from canaryd.metrics.envoy import cluster_pattern
from canaryd.settings import PrometheusSettings


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
