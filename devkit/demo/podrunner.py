"""The local pod runner: one local whoami process for every whoami Pod running on the fake Node.

kwok marks the Pods of the devstack's Node Running/Ready and gives them Pod IPs (10.244.x.y), and
the EndpointSlice controller publishes those IPs, but nothing runs in a kwok Pod and nothing on
this host listens on a Pod IP. The pod runner plays the container: for each Pod that

* is bound to a Node (``spec.nodeName``; only ``node`` when one is given), is ``Running`` with a
  ``status.podIP`` and is not being deleted, and
* has a container whose image is ``whoami`` (``traefik/whoami:v1.11``, any registry or tag),

it starts ``python -m devkit.demo.whoami`` with that container's ``--name`` and with the Pod's
name as its Hostname and the Pod IP as its IP, on a free port of 127.0.0.1. The container's
``--port`` (traefik/whoami's default 80; ``WHOAMI_NAME``/``WHOAMI_PORT_NUMBER`` in its env count
too) is the port the process *stands for*: the data plane sends a slice endpoint
``(podIP, port)`` to the process only when ``port`` is that one (``PodAddress``, see
``devkit.demo.routing.pod_endpoint``). So the seed's bad release — ``--port=8080`` behind a
Service port that targets 80 — refuses every connection, as it does on a real cluster. The
demo's own flags ``--error-ratio`` and ``--latency-ms`` in the container's args are passed on.

A Pod that goes away (deleted, no longer Running, its IP changed) has its process stopped
(SIGTERM, then SIGKILL after 5 s). A process that exits on its own is restarted with a capped
backoff while its Pod is wanted, as a kubelet restarts a container. Each process exits by itself
when the pod runner's process is gone (``--exit-with-parent``: the runner holds the write end of
its stdin, which ends then), so a killed data plane leaves no listeners behind. Logs (stderr) go
to ``<log_dir>/pod-<pod>.log`` when a ``log_dir`` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog

from devkit.demo.routing import PodAddress

log = structlog.get_logger("devkit.demo.podrunner")

WHOAMI_IMAGE = "whoami"  # the image's repository name, e.g. traefik/whoami:v1.11
DEFAULT_PORT = 80  # traefik/whoami's default --port
PASSED_ON = ("error-ratio", "latency-ms")  # the demo whoami's own flags, passed on when present
STOP_GRACE_S = 5.0
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 10.0


@dataclass(frozen=True)
class PodInstance:
    """One Pod's process, as the Pod describes it."""

    uid: str
    name: str  # the Pod's name: the process's Hostname
    ip: str  # status.podIP
    whoami_name: str  # the container's --name ("" = none, as in traefik/whoami)
    port: int  # the container's --port: where the process "listens" in the Pod
    extra: tuple[str, ...] = ()  # passed-on flags, e.g. ("--error-ratio=0.1",)

    def address(self, local_port: int | None) -> PodAddress:
        return PodAddress(pod=self.name, port=self.port, local_port=local_port)


# --------------------------------------------------------------------------- pure


def image_name(image: str) -> str:
    """The repository's last path element: ``registry:5000/traefik/whoami:v1.11@sha256:..`` -> whoami."""
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


def whoami_container(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    containers: list[Mapping[str, Any]] = (pod.get("spec") or {}).get("containers") or []
    for c in containers:
        if image_name(str(c.get("image", ""))) == WHOAMI_IMAGE:
            return c
    return None


def _flags(args: Sequence[str]) -> dict[str, str]:
    """Go's flag syntax: ``-x=v``, ``--x=v``, ``-x v``, ``--x v``; a later flag wins."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = str(args[i])
        i += 1
        if not arg.startswith("-") or arg in ("-", "--"):
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        if not eq and i < len(args) and not str(args[i]).startswith("-"):
            value, i = str(args[i]), i + 1
        out[name] = value
    return out


def container_flags(container: Mapping[str, Any]) -> tuple[str, int, tuple[str, ...]]:
    """(name, port, passed-on flags) of a whoami container: args, then env, then defaults."""
    env = {str(e.get("name")): str(e.get("value", "")) for e in container.get("env") or []}
    flags = _flags([*(container.get("command") or [])[1:], *(container.get("args") or [])])
    name = flags.get("name", env.get("WHOAMI_NAME", ""))
    port_text = flags.get("port", env.get("WHOAMI_PORT_NUMBER", str(DEFAULT_PORT)))
    port = int(port_text) if port_text.isdigit() else DEFAULT_PORT
    extra = tuple(f"--{k}={flags[k]}" for k in PASSED_ON if k in flags)
    return name, port, extra


def pod_instance(pod: Mapping[str, Any], *, node: str | None = None) -> PodInstance | None:
    """The process a Pod should have, None when it should have none."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    bound = spec.get("nodeName")
    if meta.get("deletionTimestamp") or not bound or (node is not None and bound != node):
        return None
    if status.get("phase") != "Running" or not status.get("podIP"):
        return None
    container = whoami_container(pod)
    if container is None:
        return None
    name, port, extra = container_flags(container)
    return PodInstance(
        uid=str(meta.get("uid") or meta["name"]),
        name=str(meta["name"]),
        ip=str(status["podIP"]),
        whoami_name=name,
        port=port,
        extra=extra,
    )


def wanted_instances(pods: Iterable[Mapping[str, Any]], *, node: str | None = None) -> dict[str, PodInstance]:
    out: dict[str, PodInstance] = {}
    for pod in pods:
        inst = pod_instance(pod, node=node)
        if inst is not None:
            out[inst.uid] = inst
    return out


def gone_addresses(pods: Iterable[Mapping[str, Any]]) -> dict[str, PodAddress]:
    """The IPs of Pods that are going or gone (being deleted, Succeeded, Failed): their slice
    endpoints may linger a moment; they are left out quietly, like a starting Pod's."""
    out: dict[str, PodAddress] = {}
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        ip = status.get("podIP")
        if ip and (meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed")):
            out[str(ip)] = PodAddress(pod=str(meta.get("name", "")), port=0, local_port=None)
    return out


def whoami_argv(inst: PodInstance, python: str = sys.executable) -> list[str]:
    return [
        python,
        "-m",
        "devkit.demo.whoami",
        f"--name={inst.whoami_name}",
        "--port=0",
        f"--hostname={inst.name}",
        "--ip=127.0.0.1",
        "--ip=::1",
        f"--ip={inst.ip}",
        "--exit-with-parent",
        *inst.extra,
    ]


# --------------------------------------------------------------------------- processes


@dataclass
class _Running:
    inst: PodInstance
    task: asyncio.Task[None] | None = None
    pid: int | None = None
    local_port: int | None = None
    tried: asyncio.Event = field(default_factory=asyncio.Event)  # the first start is over (ready or not)


class PodRunner:
    """Keeps one whoami process per wanted Pod; ``on_change()`` after each start and stop."""

    def __init__(
        self,
        *,
        on_change: Callable[[], None],
        python: str = sys.executable,
        log_dir: Path | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        self._on_change = on_change
        self._python = python
        self._log_dir = log_dir
        self._start_timeout_s = start_timeout_s
        self._running: dict[str, _Running] = {}
        self._stopping: list[_Running] = []  # not wanted any more, their process not gone yet

    def reconcile(self, wanted: Mapping[str, PodInstance]) -> None:
        """Start what is wanted and not running, stop what runs and is not wanted (or changed)."""
        for uid, run in list(self._running.items()):
            if wanted.get(uid) != run.inst:
                del self._running[uid]
                self._stop_later(run)
        for uid, inst in wanted.items():
            if uid not in self._running:
                run = _Running(inst=inst)
                run.task = asyncio.create_task(self._keep(run), name=f"pod-{inst.name}")
                self._running[uid] = run

    def addresses(self) -> dict[str, PodAddress]:
        """By Pod IP; a ready process wins over one that is still starting for the same IP."""
        out: dict[str, PodAddress] = {}
        for run in self._running.values():
            if run.inst.ip not in out or run.local_port is not None:
                out[run.inst.ip] = run.inst.address(run.local_port)
        return out

    def pids(self) -> dict[str, int]:
        """Pod name -> pid of every process that has not exited yet (stopping ones too)."""
        return {r.inst.name: r.pid for r in (*self._stopping, *self._running.values()) if r.pid is not None}

    def _stop_later(self, run: _Running) -> None:
        if run.task is None or run.task.done():
            return
        self._stopping.append(run)
        run.task.add_done_callback(lambda _t: self._stopping.remove(run))
        run.task.cancel()

    async def settled(self) -> None:
        """Until every process wanted so far has been started once (ready, or failed to start)."""
        events = [r.tried.wait() for r in self._running.values()]
        if not events:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*events), self._start_timeout_s + STOP_GRACE_S)
        except TimeoutError:
            log.warning("pod_processes_not_settled", pods=sorted(r.inst.name for r in self._running.values()))

    async def stop(self) -> None:
        tasks = [r.task for r in (*self._stopping, *self._running.values()) if r.task is not None]
        self._running.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _keep(self, run: _Running) -> None:
        backoff = BACKOFF_START_S
        while True:
            try:
                code = await self._run_once(run)
            except OSError as exc:
                code = None
                log.warning("pod_process_not_started", pod=run.inst.name, error=str(exc))
            finally:
                run.tried.set()
            log.warning("pod_process_exited", pod=run.inst.name, code=code, restart_in_s=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _run_once(self, run: _Running) -> int | None:
        stderr = self._stderr(run.inst)
        try:
            proc = await asyncio.create_subprocess_exec(
                *whoami_argv(run.inst, self._python),
                stdin=asyncio.subprocess.PIPE,  # never written: its EOF tells the process we are gone
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        finally:
            if not isinstance(stderr, int):
                stderr.close()
        run.pid = proc.pid
        try:
            run.local_port = await self._ready_port(proc)
            run.tried.set()
            if run.local_port is None:
                return proc.returncode  # no ready line: stopped below, restarted by _keep
            log.info("pod_process_ready", pod=run.inst.name, ip=run.inst.ip, port=run.inst.port, local=run.local_port)
            self._on_change()
            return await proc.wait()
        finally:
            await _terminate(proc)
            was_ready, run.local_port, run.pid = run.local_port is not None, None, None
            if was_ready:
                self._on_change()

    async def _ready_port(self, proc: asyncio.subprocess.Process) -> int | None:
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self._start_timeout_s)
            return int(json.loads(line)["port"])
        except (TimeoutError, ValueError, KeyError, TypeError):
            return None

    def _stderr(self, inst: PodInstance) -> IO[bytes] | int:
        if self._log_dir is None:
            return asyncio.subprocess.DEVNULL
        self._log_dir.mkdir(parents=True, exist_ok=True)
        return (self._log_dir / f"pod-{inst.name}.log").open("ab")


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
