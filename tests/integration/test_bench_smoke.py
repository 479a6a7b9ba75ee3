"""The smoke benchmark runs end to end and writes well-formed results (never asserts times)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {"n", "p50", "p95", "p99", "max", "mean"}


def _summary(d: dict[str, Any], n: int | None = None) -> None:
    assert set(d) == SUMMARY_KEYS
    if n is not None:
        assert d["n"] == n
    for k in SUMMARY_KEYS - {"n"}:
        assert d[k] is None or isinstance(d[k], (int, float))


def _daemon(d: dict[str, Any]) -> None:
    assert {"peak_rss_mb", "cpu_seconds", "cpu_seconds_per_minute", "wall_seconds"} <= set(d)
    assert d["peak_rss_mb"] > 0


def test_smoke_bench_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    # A subprocess: the bench owns its event loop, control plane and Prometheus.
    proc = subprocess.run(
        [sys.executable, "-m", "devkit.bench.run", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())

    assert r["name"] == "smoke" and "--smoke" in r["command"]
    assert r["machine"]["nproc"] >= 1 and r["machine"]["python"]

    react = r["reaction"]
    _summary(react["seconds_from_annotation_sent"], n=react["routes"])
    _summary(react["seconds_from_annotation_acknowledged"], n=react["routes"])
    _daemon(react["daemon"])

    rb = r["rollback"]
    assert rb["scenarios"]
    for s in rb["scenarios"]:
        assert s["routes"] >= 1 and 0 <= s["rolled_back"] <= s["routes"]
        _summary(s["seconds_to_rollback"], n=s["rolled_back"])
        _summary(s["bad_version_requests"])
        _summary(s["bad_version_share"])
    _daemon(rb["daemon"])

    assert r["scale"]
    for s in r["scale"]:
        assert s["routes"] >= 1 and isinstance(s["all_promoted"], bool)
        _summary(s["step_jitter_seconds"])
        _daemon(s["daemon"])
        for k in ("route_writes", "step_transitions", "expected_transitions", "prometheus_queries"):
            assert isinstance(s[k], (int, float)) and s[k] >= 0
