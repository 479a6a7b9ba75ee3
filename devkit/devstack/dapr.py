"""A local Dapr mesh on loopback in self-hosted mode: Dapr Sentry plus one daprd per app-id.

What runs (binaries from the cache, see ``devkit.devstack.binaries``):

* **Dapr Sentry**, the mesh's certificate authority, with a trust bundle made here with
  ``openssl`` (root CA + issuer, EC P-256, in ``<dir>/dapr/``) and trust domain ``cluster.local``,
  in namespace ``dapr-system``. Sentry could generate the bundle itself when the files are
  missing, but it then writes into the directory it watches and reloads its CA two seconds later,
  under the first daprds' feet; a bundle written beforehand avoids that. In self-hosted mode Sentry
  signs with its built-in ``insecure`` validator (no token): every daprd gets
  ``spiffe://public/ns/<namespace>/<app-id>``.
* **daprd** per ``DaprApp``, ``--mode standalone``, every port free and on 127.0.0.1 (HTTP API,
  gRPC API, internal gRPC — the daprd-to-daprd hop —, metrics), no placement and no scheduler
  (no actors, no jobs). With ``mtls=True`` (the default) it gets its certificate from Sentry
  (``--enable-mtls --sentry-address``, trust anchors in ``DAPR_TRUST_ANCHORS``, the env var
  daprd 1.14 reads; it has no flag for them) and the internal gRPC port speaks mTLS only.
  Service invocation resolves app-ids with the SQLite name resolver on one file shared by the
  mesh (``<dir>/dapr/names.db``): each daprd registers ``127.0.0.1:<internal gRPC port>``
  (``DAPR_HOST_IP=127.0.0.1``, else daprd would pick the host's outbound address).
  ``NAMESPACE`` sets the daprd's namespace, so ``/v1.0/invoke/whoami.default/method/...`` works.
  Dapr "shared" (one daprd in front of a Service) is a daprd whose app channel points at that
  Service's address: ``DaprApp("whoami", app_port=<the data plane's listener>)``.

Every process is started through ``/usr/bin/env`` so its command line (``DaprMesh.argv``) is the
whole recipe, environment included, and ``controlplane.restart`` could replay it. Logs go to
``<dir>/logs/<name>.log`` (names ``dapr-sentry``, ``daprd-<app-id>``). ``start_mesh`` returns once
Sentry's ``/healthz`` answers 200 and every daprd's ``/v1.0/healthz`` answers 2xx (daprd is only
healthy once its app port accepts connections: start the app first); a process that exits
during startup fails it with its log tail. ``DaprMesh.pids`` is ready for ``StackInfo.pids``:
each process leads its own process group, which ``controlplane.stop_pids`` (and so
``canaryd devstack down``) terminates, SIGTERM then SIGKILL.

Metrics (Prometheus text on any path of the metrics port, so the default ``/metrics`` works):
``DaprMesh.add_scrape_targets(prometheus)`` registers one job per process (``DaprMesh.scrape_jobs``:
``daprd-<app-id>``, ``dapr-sentry``). Sentry's healthz and metrics servers take no listen address in 1.14: they bind
all interfaces (on a free port).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import structlog

from devkit import DevstackError
from devkit.devstack.binaries import Binaries, binaries
from devkit.devstack.controlplane import _openssl, _spawn, _wait_http, free_port, stop_pids
from devkit.devstack.prometheus import PrometheusServer

log = structlog.get_logger()

TRUST_DOMAIN = "cluster.local"
"""Sentry's (the control plane's) trust domain; daprds check Sentry's identity against it."""
CONTROL_PLANE_NAMESPACE = "dapr-system"
WORKLOAD_TRUST_DOMAIN = "public"
"""The trust domain Sentry's insecure validator gives daprds (no Configuration sets another)."""
SENTRY_LOG = "dapr-sentry"
_LOOPBACK = "127.0.0.1"
_ATTEMPTS = 3  # a free port can be taken between probe and bind
T = TypeVar("T")


@dataclass(frozen=True)
class DaprApp:
    """One daprd to run: its app-id, namespace and app channel (``app_port=None``: no app)."""

    app_id: str
    namespace: str = "default"
    app_port: int | None = None
    app_channel_address: str = _LOOPBACK


@dataclass(frozen=True)
class Daprd:
    app: DaprApp
    http_port: int
    grpc_port: int
    internal_grpc_port: int
    metrics_port: int
    pid: int
    log_file: Path
    ready_s: float  # from spawn to healthy

    @property
    def name(self) -> str:
        return f"daprd-{self.app.app_id}"

    @property
    def http_url(self) -> str:
        return f"http://{_LOOPBACK}:{self.http_port}"

    @property
    def metrics_address(self) -> str:
        return f"{_LOOPBACK}:{self.metrics_port}"

    def invoke_url(self, app_id: str, method: str, namespace: str | None = None) -> str:
        """This daprd's service-invocation URL for ``app_id[.namespace]``'s ``method`` (a path)."""
        target = f"{app_id}.{namespace}" if namespace else app_id
        return f"{self.http_url}/v1.0/invoke/{target}/method/{method.lstrip('/')}"


@dataclass(frozen=True)
class Sentry:
    port: int
    healthz_port: int
    metrics_port: int
    pid: int
    trust_anchors: Path  # the root CA (PEM), what daprds trust
    log_file: Path
    ready_s: float

    @property
    def address(self) -> str:
        return f"{_LOOPBACK}:{self.port}"

    @property
    def metrics_address(self) -> str:
        return f"{_LOOPBACK}:{self.metrics_port}"


@dataclass
class DaprMesh:
    dir: Path
    mtls: bool
    sentry: Sentry | None
    daprds: dict[str, Daprd] = field(default_factory=dict)  # by app-id
    argv: dict[str, list[str]] = field(default_factory=dict)  # by process name

    @property
    def pids(self) -> dict[str, int]:
        """Process name -> pid in start order (``stop_pids`` stops in reverse: daprds first)."""
        out = {SENTRY_LOG: self.sentry.pid} if self.sentry else {}
        out.update({d.name: d.pid for d in self.daprds.values()})
        return out

    @property
    def scrape_jobs(self) -> dict[str, str]:
        """Prometheus job -> metrics address: ``daprd-<app-id>`` per daprd, ``dapr-sentry``."""
        jobs = {d.name: d.metrics_address for d in self.daprds.values()}
        if self.sentry:
            jobs[SENTRY_LOG] = self.sentry.metrics_address
        return jobs

    def add_scrape_targets(self, prometheus: PrometheusServer) -> None:
        """Have ``prometheus`` scrape every process (``prometheus.remove_target(job)`` undoes it)."""
        for job, address in self.scrape_jobs.items():
            prometheus.add_target(job, address)

    def stop(self) -> None:
        """SIGTERM every process group, SIGKILL what is left after the grace period."""
        stop_pids(self.pids)
        log.info("dapr_mesh_stopped", dir=str(self.dir))

    def __enter__(self) -> DaprMesh:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def start_mesh(
    directory: Path,
    apps: Sequence[DaprApp],
    *,
    mtls: bool = True,
    bins: Binaries | None = None,
    timeout: float = 60.0,
) -> DaprMesh:
    """Start Sentry (with ``mtls``) and one daprd per app in ``directory``; stopped again on failure."""
    if len({a.app_id for a in apps}) != len(apps):
        raise DevstackError(f"duplicate app-ids in {[a.app_id for a in apps]}: each daprd needs its own")
    b = bins or binaries()
    directory = directory.resolve()
    home = directory / "dapr"
    home.mkdir(parents=True, exist_ok=True)
    mesh = DaprMesh(dir=directory, mtls=mtls, sentry=None)
    try:
        if mtls:
            anchors = _trust_bundle(home)
            mesh.sentry = _retry_ports(partial(_start_sentry, mesh, b, anchors, timeout))
        config = _write_daprd_config(home)
        for app in apps:
            mesh.daprds[app.app_id] = _retry_ports(partial(_start_daprd, mesh, b, app, config, timeout))
    except BaseException:
        mesh.stop()
        raise
    log.info(
        "dapr_mesh_started",
        dir=str(directory),
        mtls=mtls,
        sentry=mesh.sentry.address if mesh.sentry else None,
        daprds={a: d.http_url for a, d in mesh.daprds.items()},
    )
    return mesh


# -- the trust bundle and configuration -----------------------------------------------------------


def _trust_bundle(home: Path) -> Path:
    """Root CA and issuer for Sentry in ``home/credentials`` (kept across restarts); returns the root."""
    creds, pki = home / "credentials", home / "pki"
    root, issuer, issuer_key = creds / "ca.crt", creds / "issuer.crt", creds / "issuer.key"
    if root.exists() and issuer.exists() and issuer_key.exists():
        return root
    creds.mkdir(exist_ok=True)
    pki.mkdir(exist_ok=True)
    root_key, csr, ext = pki / "ca.key", pki / "issuer.csr", pki / "issuer.ext"
    p256 = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    _openssl("genpkey", *p256, "-out", str(root_key))
    _openssl(
        "req", "-x509", "-new", "-key", str(root_key), "-sha256", "-days", "365",
        "-subj", f"/O={TRUST_DOMAIN}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", str(root),
    )  # fmt: skip
    _openssl("genpkey", *p256, "-out", str(issuer_key))
    _openssl("req", "-new", "-key", str(issuer_key), "-subj", "/O=canaryd devstack Dapr issuer", "-out", str(csr))
    ext.write_text(
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n"
    )
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(root), "-CAkey", str(root_key), "-CAcreateserial",
        "-sha256", "-days", "365", "-extfile", str(ext), "-out", str(issuer),
    )  # fmt: skip
    return root


def _write_daprd_config(home: Path) -> Path:
    """The daprds' Configuration: the SQLite name resolver on one file of the mesh, emptied first
    (a killed daprd's row would be picked, at random, until it is 5 s old)."""
    for stale in home.glob("names.db*"):
        stale.unlink()
    path = home / "config.yaml"
    path.write_text(
        "apiVersion: dapr.io/v1alpha1\n"
        "kind: Configuration\n"
        "metadata:\n"
        "  name: devstack\n"
        "spec:\n"
        "  nameResolution:\n"
        "    component: sqlite\n"
        "    configuration:\n"
        f'      connectionString: "{home / "names.db"}"\n'
    )
    return path


# -- processes --------------------------------------------------------------------------------------


def _env_argv(env: dict[str, str], argv: list[str]) -> list[str]:
    """``argv`` run through env(1) with exactly these variables added (and Kubernetes' unset: its
    presence would switch Sentry to Kubernetes mode)."""
    env_bin = shutil.which("env") or "/usr/bin/env"
    return [env_bin, "-u", "KUBERNETES_SERVICE_HOST", *(f"{k}={v}" for k, v in env.items()), *argv]


def _start_sentry(mesh: DaprMesh, b: Binaries, anchors: Path, timeout: float) -> Sentry:
    home = mesh.dir / "dapr"
    config = home / "sentry.yaml"
    # Self-hosted Sentry reads a Configuration file (defaults: 24h workload certs, 15m clock skew).
    config.write_text("apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata:\n  name: daprsystem\nspec: {}\n")
    port, healthz, metrics = free_port(), free_port(), free_port()
    argv = _env_argv(
        {"NAMESPACE": CONTROL_PLANE_NAMESPACE},
        [
            str(b.sentry),
            f"--config={config}",
            f"--issuer-credentials={anchors.parent}",
            f"--issuer-ca-filename={anchors.name}",
            "--issuer-certificate-filename=issuer.crt",
            "--issuer-key-filename=issuer.key",
            f"--trust-domain={TRUST_DOMAIN}",
            f"--listen-address={_LOOPBACK}",
            f"--port={port}",
            f"--healthz-port={healthz}",
            f"--metrics-port={metrics}",
            "--log-level=info",
        ],
    )
    pid, ready = _launch(mesh, SENTRY_LOG, argv, f"http://{_LOOPBACK}:{healthz}/healthz", timeout)
    return Sentry(port, healthz, metrics, pid, anchors, mesh.dir / "logs" / f"{SENTRY_LOG}.log", ready)


def _start_daprd(mesh: DaprMesh, b: Binaries, app: DaprApp, config: Path, timeout: float) -> Daprd:
    http, grpc, internal, metrics = free_port(), free_port(), free_port(), free_port()
    env = {"NAMESPACE": app.namespace, "DAPR_HOST_IP": _LOOPBACK}
    security = ["--enable-mtls=false"]
    if mesh.sentry is not None:
        env["DAPR_TRUST_ANCHORS"] = mesh.sentry.trust_anchors.read_text()
        security = [
            "--enable-mtls=true",
            f"--sentry-address={mesh.sentry.address}",
            f"--control-plane-trust-domain={TRUST_DOMAIN}",
            f"--control-plane-namespace={CONTROL_PLANE_NAMESPACE}",
        ]
    channel = []
    if app.app_port is not None:
        channel = [f"--app-port={app.app_port}", f"--app-channel-address={app.app_channel_address}"]
    argv = _env_argv(
        env,
        [
            str(b.daprd),
            "--mode=standalone",
            f"--app-id={app.app_id}",
            *channel,
            f"--dapr-listen-addresses={_LOOPBACK}",
            f"--dapr-http-port={http}",
            f"--dapr-grpc-port={grpc}",
            f"--dapr-internal-grpc-port={internal}",
            f"--dapr-internal-grpc-listen-address={_LOOPBACK}",
            f"--metrics-port={metrics}",
            f"--metrics-listen-address={_LOOPBACK}",
            *security,
            f"--config={config}",
            "--log-level=info",
        ],
    )
    name = f"daprd-{app.app_id}"
    pid, ready = _launch(mesh, name, argv, f"http://{_LOOPBACK}:{http}/v1.0/healthz", timeout)
    return Daprd(app, http, grpc, internal, metrics, pid, mesh.dir / "logs" / f"{name}.log", ready)


def _launch(mesh: DaprMesh, name: str, argv: list[str], health_url: str, timeout: float) -> tuple[int, float]:
    """Spawn ``name`` (recorded in ``mesh.argv``), wait until ``health_url`` answers 2xx."""
    started = time.monotonic()
    proc = _spawn(name, argv, mesh.dir)
    mesh.argv[name] = argv
    try:
        _wait_http(health_url, token=None, proc=proc, name=name, directory=mesh.dir, timeout=timeout)
    except BaseException:
        stop_pids({name: proc.pid})
        raise
    ready = time.monotonic() - started
    log.info("dapr_process_ready", name=name, pid=proc.pid, ready_s=round(ready, 2))
    return proc.pid, ready


def _retry_ports(start: Callable[[], T]) -> T:
    """Run ``start`` again (with new free ports) when a port was taken before it bound."""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return start()
        except DevstackError as exc:
            if "address already in use" not in str(exc) or attempt == _ATTEMPTS:
                raise
            log.info("dapr_port_taken_retrying", attempt=attempt)
    raise AssertionError("unreachable")
