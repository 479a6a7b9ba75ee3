"""``python -m devkit.bench.memtrace OUT -- <canaryd args>``: run canaryd under ``tracemalloc``.

A bench tool (``python -m devkit.bench.run --tracemalloc``): the daemon runs as usual; a thread
snapshots the traced heap whenever it is at a new high (10 % above the last snapshot), and at exit
OUT gets the peak, the snapshot taken at the highest point grouped by top-level package and by
line, and the process's VmHWM / VmRSS. Python allocations only: memory that C libraries (OpenSSL,
glibc arenas) take outside Python's allocator shows as the gap between VmHWM and the traced peak.
"""

from __future__ import annotations

import atexit
import collections
import sys
import threading
import time
import tracemalloc
from pathlib import Path

FRAMES = 8


def _status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) / 1024
    return out


def _package(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/canaryd/" in filename:
        return "canaryd." + filename.rsplit("/canaryd/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "python3" in filename and "/lib/" in filename:
        return "stdlib:" + filename.rsplit("/", 1)[1].removesuffix(".py")
    return filename


def _owner(tb: tracemalloc.Traceback) -> str:
    """The innermost frame outside the import machinery, as a package name."""
    for frame in reversed(tb):  # tracemalloc lists the oldest frame first
        if not frame.filename.startswith("<frozen"):
            return _package(frame.filename)
    return tb[0].filename


class Sampler:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.best: tracemalloc.Snapshot | None = None
        self.imported: tracemalloc.Snapshot | None = None  # once canaryd.cli is imported
        self.best_size = 0
        self.best_at = 0.0
        self.t0 = time.monotonic()
        self._stop = threading.Event()

    def loop(self) -> None:
        while not self._stop.wait(1.0):
            current, _peak = tracemalloc.get_traced_memory()
            if current > self.best_size * 1.1:
                self.best = tracemalloc.take_snapshot()
                self.best_size = current
                self.best_at = time.monotonic() - self.t0

    def write(self) -> None:
        self._stop.set()
        current, peak = tracemalloc.get_traced_memory()
        st = _status()
        lines = [
            f"traced now {current / 1e6:.1f} MB, traced peak {peak / 1e6:.1f} MB; "
            f"VmHWM {st.get('VmHWM', 0):.1f} MB, VmRSS {st.get('VmRSS', 0):.1f} MB",
        ]
        k8s = sorted(m for m in sys.modules if m.startswith("kubernetes_asyncio"))
        shown = ", ".join(k8s) if len(k8s) <= 30 else ", ".join(k8s[:10]) + ", ..."
        lines.append(f"{len(sys.modules)} modules loaded, {len(k8s)} of kubernetes_asyncio: {shown}")
        if self.best is not None:
            snap = self.best.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            stats = snap.statistics("traceback")
            by_pkg: collections.Counter[str] = collections.Counter()
            for s in stats:
                by_pkg[_owner(s.traceback)] += s.size
            total = sum(by_pkg.values())
            lines += ["", f"snapshot at {self.best_at:.0f}s: {total / 1e6:.1f} MB traced, by package:"]
            lines += [f"  {v / 1e6:7.2f} MB  {k}" for k, v in by_pkg.most_common(30)]
            lines += ["", "top lines:"]
            for s in snap.statistics("lineno")[:40]:
                f = s.traceback[0]
                lines.append(f"  {s.size / 1e6:7.2f} MB  {s.count:8d}  {f.filename}:{f.lineno}")
            if self.imported is not None:
                lines += ["", "growth since canaryd.cli was imported, by allocating line:"]
                for d in snap.compare_to(self.imported, "lineno")[:40]:
                    f = d.traceback[0]
                    lines.append(f"  {d.size_diff / 1e6:+7.2f} MB  {d.count_diff:+8d}  {f.filename}:{f.lineno}")
        self.out.write_text("\n".join(lines) + "\n")


def main() -> int:
    out = Path(sys.argv[1])
    argv = sys.argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    tracemalloc.start(FRAMES)
    sampler = Sampler(out)
    threading.Thread(target=sampler.loop, name="memtrace", daemon=True).start()
    atexit.register(sampler.write)
    from canaryd.cli import main as canaryd_main

    sampler.imported = tracemalloc.take_snapshot()
    return canaryd_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
