"""``python -m devkit.bench.report devkit/bench/results/full.json``: the results as Markdown tables
(pasted into docs/benchmarks.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _f(v: Any, unit: str = "", scale: float = 1.0, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, (int, float)):
        return f"{v * scale:.{digits}f}{unit}"
    return str(v)


def _q(s: dict[str, Any], unit: str = " s", scale: float = 1.0, digits: int = 2) -> tuple[str, str, str, str]:
    return (
        _f(s["p50"], unit, scale, digits),
        _f(s["p95"], unit, scale, digits),
        _f(s["p99"], unit, scale, digits),
        _f(s["max"], unit, scale, digits),
    )


def _causes(s: dict[str, Any]) -> str:
    """Route writes split by cause; older results only allow steps vs the rest."""
    c = s.get("writes_by_cause")
    if c:
        return f"{c['step']} / {c['analysis_hold']} / {c['other']}"
    rest = s["route_writes"] - s["step_transitions"]
    if rest == 0:
        return f"{s['step_transitions']} / 0 / 0"
    return f"{s['step_transitions']} / {rest} (hold + other, not split) / –"


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    out = [
        f"Command: `{r['command']}` — started {r['started_at']}, took {r['seconds']} s.",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gb']} GB, Python {m['python']}, "
        f"load average {m['loadavg'][0]} at start, {m.get('loadavg_end', ['?'])[0]} at end.",
        "",
    ]
    if "reaction" in r:
        x = r["reaction"]
        out += [
            f"### Reaction ({x['routes']} routes, {x['mode']})",
            "",
            "| measured from | p50 | p95 | p99 | max |",
            "|---|---|---|---|---|",
            "| annotation patch sent | {} | {} | {} | {} |".format(
                *_q(x["seconds_from_annotation_sent"], " ms", 1000, 1)
            ),
            "| annotation patch acknowledged | {} | {} | {} | {} |".format(
                *_q(x["seconds_from_annotation_acknowledged"], " ms", 1000, 1)
            ),
            "",
        ]
    if "rollback" in r:
        x = r["rollback"]
        out += [
            f"### Time to rollback ({x['signal']}, {x['total_rps_per_route']:g} rps per route, "
            f"canary error ratio {x['bad_error_ratio']:g} from t0)",
            "",
            "| interval = window | failure threshold | rolled back | t0 → rollback p50 / p95 / max "
            "| requests to the bad version p50 / max | share of traffic p50 / max |",
            "|---|---|---|---|---|---|",
        ]
        for s in x["scenarios"]:
            t = s["seconds_to_rollback"]
            b = s["bad_version_requests"]
            sh = s["bad_version_share"]
            out.append(
                f"| {s['interval_s']:g} s | {s['failure_threshold']} | {s['rolled_back']}/{s['routes']} "
                f"| {_f(t['p50'])} / {_f(t['p95'])} / {_f(t['max'])} s "
                f"| {_f(b['p50'], digits=0)} / {_f(b['max'], digits=0)} "
                f"| {_f(sh['p50'], '%', 100, 1)} / {_f(sh['max'], '%', 100, 1)} |"
            )
        out.append("")
    rows = list(r.get("scale", []))
    if "profile" in r:
        rows.append({**r["profile"], "routes": f"{r['profile']['routes']} (pyinstrument)"})
    if rows:
        out += [
            "### Scale",
            "",
            "| routes | all promoted | step jitter p50 / p99 / max | peak RSS | CPU s/min "
            "| route writes per step per route | of which: step / analysis-hold / other "
            "| Prometheus queries per round |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in rows:
            j = s["step_jitter_seconds"]
            d = s["daemon"]
            out.append(
                f"| {s['routes']} | {'yes' if s.get('all_promoted') else 'no'} "
                f"| {_f(j['p50'])} / {_f(j['p99'])} / {_f(j['max'])} s "
                f"| {_f(d['peak_rss_mb'], ' MB', digits=0)} | {_f(d['cpu_seconds_per_minute'], digits=1)} "
                f"| {_f(s['writes_per_step_per_route'], digits=3)} "
                f"({s['route_writes']} writes / {s['step_transitions']} steps) "
                f"| {_causes(s)} "
                f"| {_f(s['prometheus_queries_per_round'], digits=1)} |"
            )
        out.append("")
        out += _delays(rows)
    return "\n".join(out)


def _delays(rows: list[dict[str, Any]]) -> list[str]:
    """Where a step's delay goes, from the daemon's own log (results from before issue 15 have none)."""
    rows = [s for s in rows if (s.get("due_to_sent_seconds") or {}).get("n")]
    if not rows:
        return []
    out = [
        "### Step delay: the daemon's share and the apiserver's (from each step's `next_at`)",
        "",
        "| routes | measured to | p50 | p95 | p99 | max | Events per step per route |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        for key, what in (
            ("due_to_analysed_seconds", "its last analysis answered (Prometheus)"),
            ("due_to_sent_seconds", "its patch sent (the daemon's share)"),
            ("due_to_acknowledged_seconds", "the apiserver's answer"),
            ("step_jitter_seconds", "the bench's watch seeing it"),
        ):
            x = s.get(key) or {}
            if not x.get("n"):
                continue
            events = _f(s.get("events_per_step_per_route"), digits=2) if key == "step_jitter_seconds" else ""
            out.append(f"| {s['routes']} | {what} | " + " | ".join(_q(x)) + f" | {events} |")
    out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    for path in args or ["devkit/bench/results/full.json"]:
        print(render(json.loads(Path(path).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
