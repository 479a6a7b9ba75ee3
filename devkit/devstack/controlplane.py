"""Starts and stops a real etcd + kube-apiserver on loopback, like controller-runtime's envtest.

The apiserver runs with a secure port on 127.0.0.1, RBAC authorization, token authentication
(an admin token in ``system:masters``) and ServiceAccount token signing, so TokenRequest works
and tests can act with exactly the RBAC a chart grants. kube-controller-manager, kube-scheduler
and kwok (one fake Node) make it a cluster: Deployments get Pods, Pods go Ready, the real
EndpointSlice controller writes the slices (devkit/devstack/controllers.py). The Gateway API
standard CRDs and Cilium's CRDs are installed, so manifests meet the real schemas.

Everything lives under one directory; ``stack.json`` there records pids and ports so another
process (``canaryd devstack down``) can stop what ``up`` started.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devkit import DevstackError
from devkit.devstack import controllers
from devkit.devstack.binaries import Binaries, binaries

STATE_FILE = "stack.json"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class StackInfo:
    dir: str
    server: str
    token: str
    etcd_url: str
    kubeconfig: str
    bin_dir: str
    pids: dict[str, int] = field(default_factory=dict)
    prometheus_url: str | None = None
    argv: dict[str, list[str]] = field(default_factory=dict)  # each component's command line, for restart()

    def save(self) -> None:
        Path(self.dir, STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> StackInfo:
        path = directory / STATE_FILE
        if not path.exists():
            raise DevstackError(
                f"no stack in {directory} ({STATE_FILE} missing); run 'canaryd devstack up --dir {directory}'"
            )
        return cls(**json.loads(path.read_text()))


def _spawn(name: str, argv: list[str], directory: Path) -> subprocess.Popen[bytes]:
    logs = directory / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        # New session: the stack outlives `devstack up` and a terminal's Ctrl-C.
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    finally:
        out.close()


def _tail(directory: Path, name: str, lines: int = 30) -> str:
    path = directory / "logs" / f"{name}.log"
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _wait_http(
    url: str, *, token: str | None, proc: subprocess.Popen[bytes], name: str, directory: Path, timeout: float
) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # readiness only; clients verify with the CA in the kubeconfig
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DevstackError(f"{name} exited with code {proc.returncode}:\n{_tail(directory, name)}")
        req = urllib.request.Request(url)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=2, context=ctx) as resp:
                if 200 <= resp.status < 300:  # daprd's healthz answers 204
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:  # e.g. 500 while a daprd initializes
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise DevstackError(f"{name} not ready at {url} after {timeout:.0f}s ({last}):\n{_tail(directory, name)}")


def _openssl(*args: str) -> None:
    try:
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    except FileNotFoundError as exc:
        raise DevstackError("openssl not found; install it (apt-get install openssl)") from exc


def kubeconfig_yaml(server: str, ca_file: Path, token: str, user: str = "admin") -> str:
    import base64

    ca = base64.b64encode(ca_file.read_bytes()).decode()
    return (
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: devstack\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n"
        f"users:\n- name: {user}\n  user:\n    token: {token}\n"
        f"contexts:\n- name: devstack\n  context:\n    cluster: devstack\n    user: {user}\n"
        "current-context: devstack\n"
    )


def start_control_plane(directory: Path, *, bins: Binaries | None = None, timeout: float = 90.0) -> StackInfo:
    """Start etcd and kube-apiserver in ``directory``, install the Gateway API CRDs, write the kubeconfig."""
    b = bins or binaries()
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / STATE_FILE).exists():
        info = StackInfo.load(directory)
        if any(_alive(p) for p in info.pids.values()):
            raise DevstackError(f"a stack already runs in {directory}; 'canaryd devstack down --dir {directory}' first")
    pki = directory / "pki"
    pki.mkdir(exist_ok=True)
    if not (pki / "sa.key").exists():
        _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
        _openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
    token = secrets.token_hex(16)
    (pki / "tokens.csv").write_text(f'{token},admin,admin-uid,"system:masters"\n')

    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    etcd_argv = [
        str(b.etcd),
        "--data-dir",
        str(directory / "etcd"),
        "--name",
        "devstack",
        "--listen-client-urls",
        etcd_url,
        "--advertise-client-urls",
        etcd_url,
        "--listen-peer-urls",
        f"http://127.0.0.1:{peer_port}",
        "--initial-advertise-peer-urls",
        f"http://127.0.0.1:{peer_port}",
        "--initial-cluster",
        f"devstack=http://127.0.0.1:{peer_port}",
        "--unsafe-no-fsync",
        "--log-level",
        "warn",
    ]
    etcd = _spawn("etcd", etcd_argv, directory)
    info = StackInfo(
        dir=str(directory),
        server=f"https://127.0.0.1:{api_port}",
        token=token,
        etcd_url=etcd_url,
        kubeconfig=str(directory / "kubeconfig"),
        bin_dir=str(b.dir),
        pids={"etcd": etcd.pid},
        argv={"etcd": etcd_argv},
    )
    info.save()
    try:
        _wait_http(f"{etcd_url}/health", token=None, proc=etcd, name="etcd", directory=directory, timeout=timeout)
        certs = directory / "certs"
        api_argv = [
            str(b.kube_apiserver),
            "--etcd-servers",
            etcd_url,
            "--etcd-prefix",
            "/registry",
            "--bind-address",
            "127.0.0.1",
            "--advertise-address",
            "127.0.0.1",
            "--secure-port",
            str(api_port),
            "--cert-dir",
            str(certs),
            "--token-auth-file",
            str(pki / "tokens.csv"),
            "--authorization-mode",
            "RBAC",
            "--service-account-issuer",
            "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file",
            str(pki / "sa.pub"),
            "--service-account-signing-key-file",
            str(pki / "sa.key"),
            "--api-audiences",
            "https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range",
            "10.0.0.0/16",  # a /24 runs out in one test session (every test's Services share it)
            "--allow-privileged=true",
            "--disable-admission-plugins",
            "ServiceAccount",
            # ConfigMaps bypass the watch cache so tests can provoke a real 410 Gone (etcd
            # compaction) for the informer's relist; canaryd itself does not watch them.
            "--watch-cache-sizes",
            "configmaps#0",
            "--v",
            "1",
        ]
        api = _spawn("kube-apiserver", api_argv, directory)
        info.pids["kube-apiserver"] = api.pid
        info.argv["kube-apiserver"] = api_argv
        info.save()
        _wait_http(
            f"{info.server}/readyz", token=token, proc=api, name="kube-apiserver", directory=directory, timeout=timeout
        )
        # The apiserver wrote a self-signed serving cert (with its CA) into --cert-dir.
        ca_file = certs / "apiserver.crt"
        Path(info.kubeconfig).write_text(kubeconfig_yaml(info.server, ca_file, token))
        install_crds(info, b)
        controllers.start(info, b, lambda name, argv: _spawn(name, argv, directory).pid)
    except BaseException:
        stop_stack(directory)
        raise
    return info


def kill(info: StackInfo, name: str, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
    """Signal one component's process group (default SIGKILL) and wait until it is gone."""
    pid = info.pids[name]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    if _alive(pid):
        raise DevstackError(f"{name} (pid {pid}) still runs {timeout:g}s after signal {sig}")


def restart(info: StackInfo, name: str, timeout: float = 90.0) -> None:
    """Start ``name`` again with its identical command line (after ``kill``) and wait until it serves."""
    directory = Path(info.dir)
    proc = _spawn(name, info.argv[name], directory)
    info.pids[name] = proc.pid
    info.save()
    if name == "etcd":
        _wait_http(f"{info.etcd_url}/health", token=None, proc=proc, name=name, directory=directory, timeout=timeout)
    elif name == "kube-apiserver":
        _wait_http(
            f"{info.server}/readyz", token=info.token, proc=proc, name=name, directory=directory, timeout=timeout
        )


def kubectl(
    info: StackInfo,
    *args: str,
    input: str | None = None,
    kubeconfig: str | None = None,
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    argv = [str(Path(info.bin_dir) / "kubectl"), "--kubeconfig", kubeconfig or info.kubeconfig, *args]
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise DevstackError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def install_crds(info: StackInfo, b: Binaries) -> None:
    kubectl(info, "apply", "--server-side", "-f", str(b.crds))
    kubectl(info, "apply", "--server-side", "-f", str(b.cilium_crds))
    kubectl(info, "wait", "--for", "condition=Established", "--timeout", "60s", "crd", "--all")


def mint_sa_kubeconfig(
    info: StackInfo, namespace: str, service_account: str, out: Path, duration: str = "2h", create: bool = True
) -> Path:
    """Write a kubeconfig that authenticates as ``namespace/service_account`` (TokenRequest)."""
    if create:
        kubectl(info, "create", "serviceaccount", service_account, "-n", namespace, check=False)
    token = kubectl(info, "create", "token", service_account, "-n", namespace, f"--duration={duration}").stdout.strip()
    ca = Path(info.dir) / "certs" / "apiserver.crt"
    out.write_text(kubeconfig_yaml(info.server, ca, token, user=f"{namespace}-{service_account}"))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.split(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_pids(pids: dict[str, int], grace: float = 10.0) -> None:
    # Stop in reverse start order: Prometheus and the apiserver before etcd.
    for _name, pid in reversed(list(pids.items())):
        if not _alive(pid):
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(pid):
            _reap(pid)
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _alive(pid):
                _reap(pid)
                time.sleep(0.05)


def stop_stack(directory: Path) -> None:
    path = directory / STATE_FILE
    if not path.exists():
        return
    info = StackInfo.load(directory)
    stop_pids(info.pids)
    info.pids = {}
    info.save()


def stack_status(directory: Path) -> dict[str, Any]:
    info = StackInfo.load(directory)
    return {
        "dir": info.dir,
        "server": info.server,
        "kubeconfig": info.kubeconfig,
        "prometheus_url": info.prometheus_url,
        "processes": {name: {"pid": pid, "running": _alive(pid)} for name, pid in info.pids.items()},
    }
