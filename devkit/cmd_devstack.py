"""``canaryd devstack up|down|status``: the real local stack as a command."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from devkit.devstack import stack


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "devstack",
        help="start/stop a real local control plane and Prometheus",
        description="A real etcd + kube-apiserver (RBAC on) with the Gateway API CRDs, and Prometheus, on loopback.",
        epilog=(
            "example:\n  canaryd devstack up --dir .devstack && source .devstack/env\n"
            "  canaryd devstack down --dir .devstack"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dsub = p.add_subparsers(dest="devstack_command", metavar="ACTION", required=True)
    for name, func, help_ in (
        ("up", _up, "start the stack and return when it is ready"),
        ("down", _down, "stop everything the stack started"),
        ("status", _status, "say what runs"),
    ):
        a = dsub.add_parser(name, help=help_)
        a.add_argument("--dir", type=Path, default=Path(".devstack"), help="stack directory (default .devstack)")
        if name == "up":
            a.add_argument("--no-prometheus", action="store_true", help="skip Prometheus")
        a.set_defaults(func=func)


def _up(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    info = stack.up(args.dir, prometheus=not args.no_prometheus)
    print(
        f"devstack ready in {time.monotonic() - t0:.1f}s: apiserver {info.server}"
        f"{', prometheus ' + info.prometheus_url if info.prometheus_url else ''};"
        f" source {Path(info.dir) / 'env'}"
    )
    return 0


def _down(args: argparse.Namespace) -> int:
    stack.down(args.dir)
    print(f"devstack in {args.dir} stopped")
    return 0


def _status(args: argparse.Namespace) -> int:
    status = stack.status(args.dir)
    print(json.dumps(status, indent=2))
    return 0 if all(p["running"] for p in status["processes"].values()) and status["processes"] else 1
