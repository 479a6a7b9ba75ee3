"""``python -m devkit.bench.run --smoke|--full``: run the benchmarks, write ``devkit/bench/results/<name>.json``.

Starts a fresh devstack control plane, a Prometheus (1 s scrape) and the synthetic exporter,
runs reaction, rollback and scale (each with its own ``canaryd run`` subprocess), stops
everything in ``finally``. Times are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from devkit.bench import scenarios
from devkit.bench.harness import bench_stack
from devkit.bench.scenarios import Env

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("reaction", "rollback", "scale", "profile")


@dataclass(frozen=True)
class Sizes:
    reaction_routes: int
    rollback_scenarios: tuple[tuple[float, int], ...]  # (interval s, failure threshold)
    rollback_routes: int
    scale_routes: tuple[int, ...]
    scale_interval_s: float
    scale_steps: str
    profile_routes: int | None


SMOKE = Sizes(
    reaction_routes=10,
    rollback_scenarios=((2.0, 1),),
    rollback_routes=2,
    scale_routes=(10,),
    scale_interval_s=3.0,
    scale_steps="50",
    profile_routes=None,
)
FULL = Sizes(
    reaction_routes=200,
    rollback_scenarios=((5.0, 1), (5.0, 2), (10.0, 1), (10.0, 2)),
    rollback_routes=8,
    scale_routes=(100, 500, 1000),
    scale_interval_s=10.0,
    scale_steps="25,50,75",
    profile_routes=1000,
)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except OSError:
        mem_kb = 0
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


async def run(
    name: str,
    sizes: Sizes,
    phases: tuple[str, ...],
    out: Path,
    keep: bool = False,
    daemon_env: dict[str, str] | None = None,
    memtrace_dir: Path | None = None,
    daemon_python: str | None = None,
) -> dict[str, Any]:
    started = time.monotonic()
    result: dict[str, Any] = {
        "name": name,
        "command": " ".join(["python", "-m", "devkit.bench.run", *sys.argv[1:]]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "note": "other test runs may share this 2-core machine; figures from a loaded machine are pessimistic",
    }
    async with bench_stack(f"canaryd-bench-{name}-", keep=keep) as stack:
        env = Env(
            api=stack.api,
            kubeconfig=stack.info.kubeconfig,
            prometheus=stack.prometheus,
            exporter=stack.exporter,
            work=stack.work,
            pids=stack.pids,
            daemon_env=dict(daemon_env or {}),
            memtrace_dir=memtrace_dir,
            daemon_python=daemon_python,
        )
        if daemon_env:
            result["daemon_env"] = dict(daemon_env)
        await _phases(env, name, sizes, phases, out, result)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


async def _phases(
    env: Env, name: str, sizes: Sizes, phases: tuple[str, ...], out: Path, result: dict[str, Any]
) -> None:
    if "reaction" in phases:
        print(f"reaction: {sizes.reaction_routes} routes", flush=True)
        result["reaction"] = await scenarios.reaction(env, sizes.reaction_routes)
    if "rollback" in phases:
        print(f"rollback: {list(sizes.rollback_scenarios)} x {sizes.rollback_routes} routes", flush=True)
        result["rollback"] = await scenarios.rollback(env, list(sizes.rollback_scenarios), sizes.rollback_routes)
    if "scale" in phases:
        result["scale"] = []
        for n in sizes.scale_routes:
            print(f"scale: {n} routes", flush=True)
            result["scale"].append(
                await scenarios.scale(env, n, interval_s=sizes.scale_interval_s, steps=sizes.scale_steps)
            )
    if "profile" in phases and sizes.profile_routes:
        print(f"profile: {sizes.profile_routes} routes under pyinstrument", flush=True)
        prof = out.with_name(f"{name}-profile.txt")
        r = await scenarios.scale(
            env,
            sizes.profile_routes,
            interval_s=sizes.scale_interval_s,
            steps=sizes.scale_steps,
            profile_to=prof,
        )
        result["profile"] = r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devkit.bench.run", description=__doc__)
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--smoke", action="store_true", help="tiny sizes, well under a minute")
    size.add_argument("--full", action="store_true", help="200/1,000-route sizes and a profile (minutes)")
    p.add_argument("--only", nargs="+", choices=PHASES, help="run only these phases")
    p.add_argument("--out", type=Path, help="result file (default devkit/bench/results/<smoke|full>.json)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs of every daemon)")
    p.add_argument("--scale-routes", nargs="+", type=int, help="route counts for scale (default by size)")
    p.add_argument("--profile-routes", type=int, help="route count for the profiled scale run (0 = none)")
    p.add_argument(
        "--daemon-env",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the scale daemons, e.g. CANARYD_PROMETHEUS__BATCH_WINDOW_S=0.5",
    )
    p.add_argument(
        "--tracemalloc",
        type=Path,
        metavar="DIR",
        help="run the scale daemons under tracemalloc (devkit.bench.memtrace); DIR/tracemalloc-<routes>.txt",
    )
    p.add_argument(
        "--daemon-python",
        metavar="PATH",
        help="interpreter for the scale daemons, e.g. a venv with `pip install .` only (as in the image)",
    )
    args = p.parse_args(argv)
    name = "smoke" if args.smoke else "full"
    sizes = SMOKE if args.smoke else FULL
    if args.scale_routes:
        sizes = dataclasses.replace(sizes, scale_routes=tuple(args.scale_routes))
    if args.profile_routes is not None:
        sizes = dataclasses.replace(sizes, profile_routes=args.profile_routes or None)
    daemon_env = dict(kv.split("=", 1) for kv in args.daemon_env)
    phases = tuple(args.only) if args.only else PHASES
    out = args.out or RESULTS / f"{name}.json"
    if args.tracemalloc:
        args.tracemalloc.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(
        run(
            name,
            sizes,
            phases,
            out,
            keep=args.keep,
            daemon_env=daemon_env,
            memtrace_dir=args.tracemalloc,
            daemon_python=args.daemon_python,
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['seconds']}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
