"""``canaryd demo``: the local end-to-end demo (devstack, data plane, whoami, load, canaryd run)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from canaryd.core.spec import parse_duration


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "demo",
        help="run two canary rollouts end to end on this machine",
        description=(
            "Start (or reuse) the devstack (apiserver, controllers, scheduler, kwok, Prometheus), apply "
            "the seed's manifests from config/samples/, run the local data plane and real Dapr (Sentry, "
            "daprds with mTLS), fixed-rate load through the Gateway and 'canaryd run'; roll whoami-v2 "
            "out (healthy: Promoted), then whoami-v3 (listens on the wrong port: RolledBack). Prints "
            "one line per change of the rollout and a summary; stops every process it started."
        ),
        epilog="example:\n  canaryd demo --dir .devstack --interval 3s --keep",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=Path(".devstack"),
        help="devstack directory, reused when a stack runs there (default .devstack)",
    )
    p.add_argument("--interval", default="3s", help="time per step and between analysis rounds (default 3s)")
    p.add_argument("--rate", type=float, default=50.0, help="load in requests per second (default 50)")
    p.add_argument("--keep", action="store_true", help="leave the devstack (and the demo's objects) running afterwards")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import structlog

    from devkit.demo.run import DemoConfig, run_with_stack

    # The demo's own library logs (load generator chunks, devstack) would drown the progress
    # lines: warnings only. The subprocesses log to files under <dir>/demo-logs.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    cfg = DemoConfig(interval_s=parse_duration("--interval", args.interval), rate=args.rate)
    result = run_with_stack(cfg, args.dir, keep=args.keep)
    ok = result.phases == {"whoami-v2": "Promoted", "whoami-v3": "RolledBack"} and not result.unanswered
    return 0 if ok else 1
