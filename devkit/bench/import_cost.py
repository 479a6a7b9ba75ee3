"""``python -m devkit.bench.import_cost [--python PATH]``: what importing the daemon costs (RSS), and who.

Each figure comes from a fresh interpreter (``--python``: e.g. a venv with ``pip install .`` only, as in
the image; default: this one) that imports the modules ``canaryd run`` imports and reads its own
``/proc/self/status``. Three runs:

- ``daemon``: as shipped (kubernetes_asyncio behind ``canaryd.kube.lazy``'s stand-ins);
- ``daemon_library_whole``: the same after ``import kubernetes_asyncio`` (every API class and model:
  what the daemon imported before issue 15);
- ``by_package``: the first run's growth split by the top-level package being imported (a package's
  own share, not what it imports of others; page-granular, so small entries are noise).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

DAEMON = (
    "canaryd.cli",
    "canaryd.commands.run",
    "canaryd.engine",
    "canaryd.kube.leader",
    "canaryd.observability",
    "canaryd.metrics",
    "canaryd.logs",
)

_PROBE = """
import builtins, collections, importlib, json, sys
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
start = rss()
first, modules = sys.argv[1], sys.argv[2:]
excl = collections.Counter()
stack = []
real = builtins.__import__
def counting(name, globals=None, locals=None, fromlist=(), level=0):
    top = name.split(".")[0] if level == 0 else None
    if top is None or top in sys.modules:
        return real(name, globals, locals, fromlist, level)
    stack.append([top, rss(), 0.0])
    try:
        return real(name, globals, locals, fromlist, level)
    finally:
        top, before, inner = stack.pop()
        grown = rss() - before
        excl[top] += grown - inner
        if stack:
            stack[-1][2] += grown
builtins.__import__ = counting
if first:
    importlib.import_module(first)
for m in modules:
    importlib.import_module(m)
k8s = [m for m in sys.modules if m.startswith("kubernetes_asyncio")]
print(json.dumps({"interpreter_mb": round(start, 1), "rss_mb": round(rss(), 1), "modules": len(sys.modules),
                  "kubernetes_asyncio_modules": len(k8s),
                  "by_package_mb": {k: round(v, 1) for k, v in excl.most_common(25)}}))
"""


def probe(python: str, first: str = "") -> dict[str, Any]:
    out = subprocess.run(
        [python, "-c", _PROBE, first, *DAEMON], capture_output=True, text=True, check=True, timeout=300, cwd="/"
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devkit.bench.import_cost", description=__doc__)
    p.add_argument("--python", default=sys.executable, help="interpreter to measure (default: this one)")
    args = p.parse_args(argv)
    shipped = probe(args.python)
    whole = probe(args.python, "kubernetes_asyncio")
    report = {
        "python": args.python,
        "daemon": {k: v for k, v in shipped.items() if k != "by_package_mb"},
        "daemon_library_whole": {k: v for k, v in whole.items() if k != "by_package_mb"},
        "by_package_mb": shipped["by_package_mb"],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
