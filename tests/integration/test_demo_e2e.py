"""``canaryd demo`` as a library, against the session's real apiserver and Prometheus.

The same flow as the CLI with shorter intervals, through the seed's request path (Gateway →
ingress daprd → mTLS → whoami daprd → GAMMA split → the process standing in for a Pod that the
real controllers, scheduler and kwok run): whoami-v2 (healthy) is promoted, whoami-v3 (the seed's
bad release, on the wrong port: every request it gets is a 503) is rolled back by analysis on
both the envoy and the real daprds' dapr signal; ``canaryd run`` is a real subprocess.

Shares: between two weight changes seen by the route watch, the share of the answered
requests a version served is binomial; we accept |observed - expected| <= 4 sigma
(``Segment.within``; a false alarm about 1 in 15,000 per check), excluding requests sent within
``settle_s`` of a change. A weight of 0 (or 100) must get exactly 0 % (100 %).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from devkit.demo.loadgen import NO_BACKEND
from devkit.demo.run import VERSIONS, DemoConfig, run_demo
from devkit.devstack.prometheus import PrometheusServer
from tests.conftest import Stack, fresh_stack

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def seed_stack() -> Iterator[Stack]:
    """A control plane of the demo's own: the seed lives in namespace ``default`` (its ingress route
    invokes ``whoami.default``, and Dapr's mTLS checks that namespace in the callee's SPIFFE ID)."""
    with fresh_stack("canaryd-demo-") as s:
        yield s


async def test_demo_promotes_good_and_rolls_back_bad(
    seed_stack: Stack,
    prometheus: PrometheusServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    stack = seed_stack
    cfg = DemoConfig(
        interval_s=2.5,
        steps=(20, 50, 100),
        settle_s=0.75,
        baseline_s=2.0,
        hold_s=2.5,
        timeout_s=150.0,
        log_dir=tmp_path_factory.mktemp("demo-logs"),
    )
    result = await run_demo(cfg, kubeconfig=str(stack.kubeconfig), prometheus=prometheus)

    # Verdicts: the healthy version promoted, the bad one rolled back by analysis.
    assert result.phases == {"whoami-v2": "Promoted", "whoami-v3": "RolledBack"}, result.lines

    # Every request was answered by the data plane: no connection errors, a backend each.
    assert result.requests, "the load generator sent nothing"
    assert result.unanswered == [], result.unanswered[:5]
    assert {r.backend for r in result.requests} <= set(VERSIONS)
    assert NO_BACKEND not in {r.backend for r in result.requests}
    bad = {(r.backend, r.status) for r in result.requests if r.status != "200"}
    assert bad <= {("whoami-v3", "503")}, bad
    assert ("whoami-v3", "503") in bad  # the seed's bad release really failed

    # Both signals judged the bad release: per version (Envoy) and whole-service (the real daprds).
    verdicts = {signal: h.verdict for signal, h in result.rollback_round.items()}
    assert verdicts == {"envoy": "fail", "dapr": "fail"}, result.lines
    assert result.rollback_round["dapr"].canary_requests, "the dapr signal saw no requests"
    # mTLS was on: Sentry signed one certificate per daprd.
    assert result.mtls_certs == 2, result.lines

    # The share each version served at each step matches the route's weights.
    measured = [s for s in result.segments if s.n > 0]
    assert len(measured) >= 6, [(s.label, s.weights, s.n) for s in result.segments]
    for s in measured:
        for backend in s.weights:
            assert s.within(backend), (
                f"{s.label}: {backend} served {s.observed(backend):.3f}, expected {s.expected(backend):.3f} "
                f"± {s.tolerance(backend):.3f} over {s.n} requests"
            )
    # The weight-0 and weight-100 stretches were checked exactly: they are there.
    assert any(s.weights == {"whoami-v2": 100, "whoami-v3": 0} and s.n > 0 for s in measured)
    assert any(s.weights.get("whoami-v2") == 20 and s.n >= 100 for s in measured)

    # Time from the first bad response to the rollback patch: printed, and bounded only by
    # behaviour — the window that gathers min-requests plus failure_threshold + 2 rounds.
    assert result.first_bad_at is not None and result.rollback_at is not None
    detection = result.detection_s
    assert detection is not None
    limit = cfg.window_s + (cfg.failure_threshold + 2) * cfg.interval_s
    print(f"first bad response -> rollback patch: {detection:.1f}s (limit {limit:g}s)")
    assert 0 < detection <= limit, result.lines

    # Every process the demo started is gone.
    assert set(result.pids) == {"dataplane", "canaryd", "dapr-sentry", "daprd-ingress", "daprd-whoami"}
    assert not [n for n, pid in result.pids.items() if _alive(pid)]
