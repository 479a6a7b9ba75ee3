"""``make image-test``: the built image's own entrypoint against a devstack, laid out as the chart's Pod.

No container engine can start a container on this machine (crun's ``setrlimit`` needs
CAP_SYS_RESOURCE), so the image's root filesystem (``buildah mount`` of ``make image``'s image) is
entered with ``chroot --userspec`` as the image's user (65532), inside a private mount namespace
set up as the kubelet sets up the chart's Pod:

* the root filesystem read-only (the chart's ``readOnlyRootFilesystem``), a 16 MiB tmpfs at /tmp
  (its emptyDir), /dev with null, zero, random, urandom, and /proc;
* a TokenRequest token of the chart's ServiceAccount, the cluster CA and the namespace in
  /var/run/secrets/kubernetes.io/serviceaccount, KUBERNETES_SERVICE_HOST/PORT: in-cluster config;
* the installed chart's ConfigMap at /etc/canaryd/config, the installed Deployment's env (field
  refs resolved for one of its real Pods, whose name the process takes) and args.

The host's network is shared (no network namespace), so the HTTP port is moved off 8080 and bound
to loopback. Then: ``helm install`` of charts/canaryd (its Pods go Ready under kwok), the image's
``canaryd run`` drives one route to Promoted, the image's ``canaryd abort --wait`` (a kubeconfig
mounted, as a user runs the image as a CLI) takes another to RolledBack; SIGTERM ends it with 0
and the Lease released. ``canaryd --help`` in the image must list exactly the shipped commands
(no devkit command), each answering ``--help``. The rootfs is checksummed (every path, mode,
owner, size and SHA-256) before and after: nothing may change outside /tmp.

Prints the figures: image and base size and build time (from hack/build-image.sh's build.json)
and this run's time. Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client

from canaryd.core import spec as ann
from canaryd.core.state import Phase, RolloutState
from canaryd.kube import new_client
from devkit import DevstackError
from devkit.devstack import chart, stack
from devkit.devstack.binaries import REPO
from devkit.devstack.controlplane import StackInfo, free_port, kubectl, mint_sa_kubeconfig
from tests.kubeobjects import create_backend, create_route, eventually, get_route, route_body, weights

FIGURES = Path(os.environ.get("CANARYD_IMAGE_CACHE", Path.home() / ".cache/canaryd/image")) / "build.json"
RELEASE, RELEASE_NS, APPS = "canaryd", "canaryd-system", "apps"
SA_DIR = "run/secrets/kubernetes.io/serviceaccount"  # /var/run is a symlink to /run in the image
CONFIG_DIR = "etc/canaryd/config"  # the chart's config volume (a mountpoint the runtime creates)
WAIT_S = 90.0
# In a private mount namespace: $1 rootfs, $2 ServiceAccount dir, $3 config dir, $4 kubeconfig or
# "", $5 working dir, $6 user; the rest is `env -i` assignments and the command.
SETUP = r"""
r=$1 sa=$2 cfg=$3 kc=$4 wd=$5 user=$6; shift 6
mount --bind "$r" "$r"
mount -t tmpfs -o size=16m,mode=1777 tmpfs "$r/tmp"
mount -t tmpfs -o mode=755 tmpfs "$r/run"
mkdir -p "$r/run/secrets/kubernetes.io/serviceaccount"
mount --bind -o ro "$sa" "$r/run/secrets/kubernetes.io/serviceaccount"
mount --bind -o ro "$cfg" "$r/etc/canaryd/config"
if [ -n "$kc" ]; then touch "$r/run/kubeconfig"; mount --bind -o ro "$kc" "$r/run/kubeconfig"; fi
mount -t tmpfs -o mode=755 tmpfs "$r/dev"
for d in null zero random urandom; do touch "$r/dev/$d"; mount --bind "/dev/$d" "$r/dev/$d"; done
mount -t proc proc "$r/proc"
mount -o remount,bind,ro "$r"
exec chroot --userspec="$user" "$r" /usr/bin/env -i -C "$wd" "$@"
"""


class Failed(Exception):
    """A check of the image failed."""


def check(ok: object, what: str) -> None:
    if not ok:
        raise Failed(what)
    print(f"  ok  {what}")


# --- the image ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    """What hack/build-image.sh recorded in build.json."""

    image: str
    base: str
    size: str
    base_size: str
    build_seconds: str
    base_seconds: str
    storage: list[str]

    @classmethod
    def load(cls) -> Built:
        if not FIGURES.is_file():
            raise DevstackError(f"{FIGURES} missing: build the image first (make image)")
        raw = json.loads(FIGURES.read_text())
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})

    def buildah(self, *args: str) -> str:
        proc = subprocess.run(["buildah", *self.storage, *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise DevstackError(f"buildah {' '.join(args)} failed: {proc.stderr.strip()}; rebuild with make image")
        return proc.stdout.strip()


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: list[str]
    env: dict[str, str]
    user: str
    workdir: str
    labels: dict[str, str]


@contextlib.contextmanager
def mounted(built: Built) -> Iterator[tuple[Path, ImageConfig]]:
    """A working container of the image, its rootfs mounted; removed afterwards."""
    cfg = json.loads(built.buildah("inspect", "--type", "image", built.image))["OCIv1"]["config"]
    config = ImageConfig(
        entrypoint=cfg["Entrypoint"],
        env=dict(e.split("=", 1) for e in cfg["Env"]),
        user=cfg["User"],
        workdir=cfg["WorkingDir"],
        labels=cfg["Labels"],
    )
    ctr = built.buildah("from", "--pull-never", "--name", f"canaryd-image-test-{os.getpid()}", built.image)
    try:
        yield Path(built.buildah("mount", ctr)), config
    finally:
        built.buildah("umount", ctr)
        built.buildah("rm", ctr)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path under ``root``: type and mode, owner, size, link target or SHA-256."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if path.is_symlink():
                content: str = os.readlink(path)
            elif path.is_file():
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = ""
            out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, content)
    return out


def changes(before: dict[str, tuple[object, ...]], after: dict[str, tuple[object, ...]]) -> list[str]:
    added = [f"+ {p}" for p in sorted(after.keys() - before.keys())]
    removed = [f"- {p}" for p in sorted(before.keys() - after.keys())]
    changed = [f"~ {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return added + removed + changed


# --- the Pod around it ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    """The chart's installed Pod, as the kubelet would start the image for it."""

    name: str
    env: dict[str, str]
    args: list[str]
    files: Path  # serviceaccount/, config/, kubeconfig


def installed_pod(info: StackInfo, files: Path) -> Pod:
    """One Ready Pod of the release, its container's env and args, and its volumes' files on disk."""
    sel = f"{chart.INSTANCE_LABEL}={RELEASE}"
    pods = json.loads(kubectl(info, "get", "pods", "-n", RELEASE_NS, "-l", sel, "-o", "json").stdout)["items"]
    pod = pods[0]
    [c] = pod["spec"]["containers"]
    fields = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": RELEASE_NS}
    env = {e["name"]: e["value"] if "value" in e else fields[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in c["env"]}
    cm = next(v["configMap"]["name"] for v in pod["spec"]["volumes"] if v["name"] == "config")
    data = json.loads(kubectl(info, "get", "configmap", cm, "-n", RELEASE_NS, "-o", "json").stdout)["data"]
    sa = pod["spec"]["serviceAccountName"]
    token = kubectl(info, "create", "token", sa, "-n", RELEASE_NS, "--duration=1h").stdout.strip()
    ca = Path(info.dir, "certs", "apiserver.crt")
    for sub, content in (
        ("serviceaccount", {"token": token, "ca.crt": ca.read_text(), "namespace": RELEASE_NS}),
        ("config", data),
    ):
        d = files / sub
        d.mkdir(parents=True)
        d.chmod(0o755)
        for name, text in content.items():
            (d / name).write_text(text)
            (d / name).chmod(0o644)  # the kubelet's defaultMode
    mint_sa_kubeconfig(info, RELEASE_NS, sa, files / "kubeconfig", duration="1h", create=False)
    (files / "kubeconfig").chmod(0o644)
    return Pod(pod["metadata"]["name"], env, c.get("args", []), files)


@dataclass(frozen=True)
class Chroot:
    root: Path
    image: ImageConfig
    pod: Pod
    info: StackInfo
    http_port: int

    def env(self, *, daemon: bool) -> dict[str, str]:
        """The image's env, then the container's (Kubernetes' order), then in-cluster config."""
        host, port = self.info.server.removeprefix("https://").rsplit(":", 1)
        env = self.image.env | {"HOSTNAME": self.pod.name, "KUBERNETES_SERVICE_HOST": host}
        env |= {"KUBERNETES_SERVICE_PORT": port, "KUBERNETES_SERVICE_PORT_HTTPS": port}
        if daemon:  # a Pod has a network of its own; here the host's is shared
            env |= self.pod.env | {"CANARYD_HTTP_HOST": "127.0.0.1", "CANARYD_HTTP_PORT": str(self.http_port)}
        return env

    def argv(
        self, command: list[str], *, daemon: bool = False, kubeconfig: Path | None = None, user: str | None = None
    ) -> list[str]:
        files = self.pod.files
        env = self.env(daemon=daemon) | ({"KUBECONFIG": "/run/kubeconfig"} if kubeconfig else {})
        return [
            *("unshare", "--mount", "--propagation", "private", "sh", "-ec", SETUP, "_", str(self.root)),
            *(str(files / "serviceaccount"), str(files / "config"), str(kubeconfig or "")),
            *(self.image.workdir, user or self.image.user),
            *(f"{k}={v}" for k, v in env.items()),
            *command,
        ]

    def run(
        self, command: list[str], *, kubeconfig: Path | None = None, user: str | None = None, timeout: float = 120
    ) -> tuple[int, str]:
        argv = self.argv(command, kubeconfig=kubeconfig, user=user)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        return proc.returncode, proc.stdout + proc.stderr


# --- the checks ---------------------------------------------------------------------------------


def shipped_commands() -> tuple[set[str], set[str]]:
    """(the commands the wheel ships, the devkit's), from this checkout's own parser."""
    from canaryd.cli import build_parser
    from devkit.commands import COMMANDS

    def names(parser: argparse.ArgumentParser) -> set[str]:
        return {n for a in parser._actions if isinstance(a, argparse._SubParsersAction) for n in a.choices}

    scratch = argparse.ArgumentParser()
    sub = scratch.add_subparsers()
    for register in COMMANDS:
        register(sub)
    dev = names(scratch)
    return names(build_parser()) - dev, dev


def check_cli(box: Chroot) -> None:
    code, out = box.run([*box.image.entrypoint, "--help"])
    check(code == 0, "canaryd --help exits 0 in the image")
    section = out.split("positional arguments:", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"(?m)^    ([a-z][\w-]*)\b", section))
    shipped, dev = shipped_commands()
    check(listed == shipped, f"canaryd --help lists exactly the shipped commands: {', '.join(sorted(listed))}")
    check(not listed & dev, f"no devkit command in the image ({', '.join(sorted(dev))} absent)")
    loop = 'for c in "$@"; do canaryd "$c" --help >/dev/null || { echo "$c --help failed"; exit 1; }; done'
    code, out = box.run(["sh", "-c", loop, "_", *sorted(listed)])
    check(code == 0, f"each listed command answers --help ({out.strip() or 'all of them'})")
    code, out = box.run([*box.image.entrypoint, "version"])
    check(code == 0 and out.split()[-1] == box.image.labels["org.opencontainers.image.version"], out.strip())
    code, out = box.run(["sh", "-c", "touch /home/nonroot/x"])
    check(code != 0 and "Read-only file system" in out, "the root filesystem is read-only (a write is refused)")


def _state(route: dict[str, Any]) -> RolloutState | None:
    raw = (route["metadata"].get("annotations") or {}).get(ann.STATE)
    return RolloutState.from_annotation(raw) if raw else None


async def _phase(api: client.ApiClient, name: str, phase: Phase) -> RolloutState | None:
    st = _state(await get_route(api, APPS, name))
    return st if st is not None and st.phase == phase else None


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except OSError as exc:
        return 0, str(exc)


async def wait_ready(box: Chroot, proc: subprocess.Popen[bytes]) -> None:
    async def ready() -> bool:
        if proc.poll() is not None:
            raise Failed(f"canaryd run exited with {proc.returncode}")
        return (await asyncio.to_thread(_http, box.http_port, "/readyz"))[0] == 200

    await eventually(ready, timeout=WAIT_S, interval=0.3, what="/readyz 200 (the chart's readinessProbe)")
    healthz = (await asyncio.to_thread(_http, box.http_port, "/healthz"))[0]
    check(healthz == 200, "/healthz and /readyz answer 200 (the chart's probes)")


async def rollout_and_abort(box: Chroot, api: client.ApiClient) -> None:
    await client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=APPS)))
    for n in ("whoami", "whoami-v1", "whoami-v2"):
        await create_backend(api, APPS, n)
    for name, steps, interval in (("whoami", "50,100", "1s"), ("whoami-abort", "10,50,100", "1h")):
        annotations = {ann.CANARY: "whoami-v2", ann.STEPS: steps, ann.INTERVAL: interval}
        await create_route(api, APPS, route_body(name, annotations=annotations))
    await eventually(lambda: _phase(api, "whoami", Phase.PROMOTED), timeout=WAIT_S, interval=0.3, what="Promoted")
    check(weights(await get_route(api, APPS, "whoami")) == {"whoami-v1": 0, "whoami-v2": 100}, "whoami Promoted")
    code, out = await asyncio.to_thread(box.run, [*box.image.entrypoint, "status", "-n", APPS])
    row = next((line for line in out.splitlines() if line.split()[:2] == [APPS, "whoami"]), "")
    check(code == 0 and "Promoted" in row, f"the image's canaryd status (in-cluster config): {row.strip() or out}")
    mid = await eventually(
        lambda: _phase(api, "whoami-abort", Phase.PROGRESSING), timeout=WAIT_S, interval=0.3, what="step 1"
    )
    check(mid.canary_weight == 10, "whoami-abort at step 1 (10%)")
    abort = [*box.image.entrypoint, "abort", "whoami-abort", "-n", APPS, "--wait", "--timeout", str(WAIT_S)]
    code, out = await asyncio.to_thread(box.run, abort, kubeconfig=box.pod.files / "kubeconfig")
    check(code == 0, f"the image's canaryd abort --wait (kubeconfig mounted) exits 0: {out.strip().splitlines()[-1]}")
    route = await get_route(api, APPS, "whoami-abort")
    st = _state(route)
    check(st is not None and st.phase == Phase.ROLLED_BACK, "whoami-abort RolledBack")
    check(weights(route) == {"whoami-v1": 100, "whoami-v2": 0}, "all traffic back on the stable")


def check_cli_as_user(box: Chroot) -> None:
    """docs/image.md's CLI recipe: ``docker run --user $(id -u):$(id -g) -v ~/.kube/config:/kubeconfig:ro``,
    i.e. another uid than the image's, reading its own mode-0600 kubeconfig."""
    own = box.pod.files / "kubeconfig-user"
    shutil.copy(box.pod.files / "kubeconfig", own)
    own.chmod(0o600)
    os.chown(own, 1000, 1000)
    code, out = box.run([*box.image.entrypoint, "status", "-A"], kubeconfig=own, user="1000:1000")
    rows = [line.split()[:3] for line in out.splitlines()[1:]]
    want = [[APPS, "whoami", "Promoted"], [APPS, "whoami-abort", "RolledBack"]]
    check(code == 0 and rows == want, f"the image as a CLI as uid 1000 with its own kubeconfig: status -A {rows}")


async def lease_holder(api: client.ApiClient, name: str) -> str | None:
    lease = await client.CoordinationV1Api(api).read_namespaced_lease(name, RELEASE_NS)
    holder: str | None = lease.spec.holder_identity
    return holder


def check_logs(log: Path) -> None:
    text = log.read_text(errors="replace")
    records = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    check(records and all(isinstance(r, dict) for r in records), f"{len(records)} JSON log lines (logFormat json)")
    check(any(r.get("event") == "leader_elected" for r in records), "leader_elected logged")
    bad = [r for r in records if r.get("event") in ("watch_failed", "lease_renew_failed", "event_failed")]
    check(not bad and "forbidden" not in text.lower(), "no failed call and no 403 with the chart's RBAC")


@contextlib.contextmanager
def daemon(box: Chroot, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The image's entrypoint with the Deployment's args (``canaryd run``), as the chart's Pod."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(box.argv([*box.image.entrypoint, *box.pod.args], daemon=True), stdout=out, stderr=out)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=20)


async def daemon_checks(box: Chroot, info: StackInfo, proc: subprocess.Popen[bytes]) -> None:
    api = await new_client(info.kubeconfig)
    try:
        await wait_ready(box, proc)
        await rollout_and_abort(box, api)
        await asyncio.to_thread(check_cli_as_user, box)
        lease = box.pod.env["CANARYD_LEASE_NAME"]
        check(await lease_holder(api, lease) == box.pod.name, f"Lease {lease} held by the Pod's name {box.pod.name}")
        metrics = (await asyncio.to_thread(_http, box.http_port, "/metrics"))[1]
        check(re.search(r"(?m)^canaryd_leader(\{[^}]*\})? 1(\.0)?$", metrics), "/metrics: canaryd_leader 1")
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        check(code == 0, "SIGTERM: canaryd run exits 0")
        check(await lease_holder(api, lease) is None, "the Lease was released on the way out")
    finally:
        await api.close()


# --- the run ------------------------------------------------------------------------------------


def install_chart(info: StackInfo, built: Built) -> None:
    repo, _, tag = built.image.rpartition(":")
    values = {
        "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
        "watchNamespaces": [APPS],
        "podDisruptionBudget": {"enabled": True},
    }
    args = ["install", RELEASE, str(chart.CHART), "-n", RELEASE_NS, "--create-namespace", "--wait", "--timeout", "120s"]
    chart.helm(info, *args, values=values)
    print(f"  ok  helm install {RELEASE} -n {RELEASE_NS}: its Pods Ready on the kwok Node")


def run(work: Path, built: Built) -> None:
    info = stack.up(work / "stack", prometheus=False)
    try:
        install_chart(info, built)
        pod = installed_pod(info, work / "pod")
        with mounted(built) as (root, image):
            (root / CONFIG_DIR).mkdir(parents=True, exist_ok=True)  # the runtime's mountpoint
            before = snapshot(root)
            box = Chroot(root, image, pod, info, free_port())
            check_cli(box)
            with daemon(box, work / "canaryd.log") as proc:
                asyncio.run(daemon_checks(box, info, proc))
            check_logs(work / "canaryd.log")
            diff = changes(before, snapshot(root))
            if diff:
                print("\n".join(diff[:50]))
            check(not diff, f"nothing written outside /tmp: {len(before)} paths of the rootfs unchanged")
    finally:
        stack.down(work / "stack")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devkit.image_test", description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", action="store_true", help="keep the work directory (stack, logs, Pod files)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("image-test: needs root (mount namespaces and chroot)", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    built = Built.load()
    work = Path(tempfile.mkdtemp(prefix="canaryd-image-test-"))
    print(f"image-test: {built.image} ({built.size}) from {REPO / 'Dockerfile'}; work dir {work}")
    try:
        run(work, built)
    except (Failed, DevstackError, AssertionError) as exc:
        print(f"image-test FAILED: {exc}", file=sys.stderr)
        log = work / "canaryd.log"
        if log.exists():
            print("last lines of canaryd run:\n" + "\n".join(log.read_text().splitlines()[-20:]), file=sys.stderr)
        print(f"work dir kept: {work}", file=sys.stderr)
        return 1
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"image-test passed in {time.monotonic() - t0:.0f}s\n"
        f"  image {built.image}: {built.size}, built in {built.build_seconds}s\n"
        f"  base  {built.base}: {built.base_size}, made in {built.base_seconds or '?'}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
