"""``describe``: a failed Prometheus query in a few words, cause first, never the (URL-encoded) query."""

from __future__ import annotations

import requests
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.exceptions import MaxRetryError, NewConnectionError

from canaryd.metrics.prometheus import describe

QUERY_URL = "/api/v1/query?query=sum+by+%28envoy_cluster_name%29+%28increase%28x%5B60s%5D%29%29"


def test_http_errors_give_prometheus_own_words() -> None:
    body = b'{"status":"error","errorType":"bad_data","error":"invalid parameter \\"query\\": 1:5: parse error"}'
    cause, outage = describe(PrometheusApiClientException(f"HTTP Status Code 400 ({body!r})"), 10)
    assert cause == 'HTTP 400 bad_data: invalid parameter "query": 1:5: parse error' and not outage
    cause, outage = describe(PrometheusApiClientException("HTTP Status Code 503 (b'<html>\\n busy </html>')"), 10)
    assert cause == "HTTP 503 <html> busy </html>" and outage
    cause, _ = describe(PrometheusApiClientException("HTTP Status Code 404 (b'404 page not found')"), 10)
    assert cause == "HTTP 404 404 page not found; is the URL Prometheus' base URL?"


def test_connection_failures_name_the_cause_not_the_url() -> None:
    refused = NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused")  # type: ignore[arg-type]
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    exc = requests.ConnectionError(MaxRetryError(None, QUERY_URL, reason=refused))  # type: ignore[arg-type]
    assert describe(exc, 10) == ("connection refused", True)
    assert describe(requests.ReadTimeout(f"Read timed out. {QUERY_URL}"), 7.5) == ("no answer within 7.5s", True)


def test_other_failures_drop_the_query() -> None:
    cause, _ = describe(RuntimeError(f"boom at url: {QUERY_URL} (details)"), 10)
    assert "%" not in cause and "query" not in cause and cause.startswith("RuntimeError: boom at")
    cause, outage = describe(requests.exceptions.JSONDecodeError("Expecting value", "<html>", 0), 10)
    assert cause.startswith("the answer is not JSON") and not outage
