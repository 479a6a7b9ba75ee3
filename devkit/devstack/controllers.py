"""The controllers that turn the bare apiserver into a cluster: Deployments get Pods, Pods get a Node.

* **kube-controller-manager** (every controller): Deployments → ReplicaSets → Pods, the real
  EndpointSlice controller (ready slices from ready Pods), namespace deletion, garbage collection.
* **kube-scheduler** binds Pods to the one Node.
* **kwok** plays the kubelet of one fake Node (``kwok-node-0``): it keeps the Node Ready (a Lease
  heartbeat) and moves the Pods bound to it to Running/Ready with an IP from ``POD_CIDR``, using
  the default stages shipped in kwok's module (hack/build-binaries.sh copies them). No container
  runs: the demo's data plane stands local processes in for the Pods (devkit/demo).

The Node carries none of kwok's usual NoSchedule taint, so manifests written for a real cluster
(the seed's Deployments) schedule unchanged. All three are ordinary children of the stack: their
pids and command lines go into ``stack.json`` like etcd's, so ``down``, ``kill`` and ``restart``
treat them alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from devkit.devstack.binaries import Binaries

if TYPE_CHECKING:
    from devkit.devstack.controlplane import StackInfo

NODE_NAME = "kwok-node-0"
NODE_ANNOTATION = "kwok.x-k8s.io/node"
POD_CIDR = "10.244.0.0/16"
NODE_IP = "10.240.0.10"
COMPONENTS = ("kube-controller-manager", "kube-scheduler", "kwok")


def argv(name: str, b: Binaries, info: StackInfo) -> list[str]:
    """The command line of one controller, for the stack in ``info``."""
    d = Path(info.dir)
    if name == "kube-controller-manager":
        return [
            str(b.kube_controller_manager),
            f"--kubeconfig={info.kubeconfig}",
            "--controllers=*",
            "--use-service-account-credentials=false",
            f"--service-account-private-key-file={d / 'pki' / 'sa.key'}",
            f"--root-ca-file={d / 'certs' / 'apiserver.crt'}",
            "--leader-elect=false",
            "--secure-port=0",
            "--bind-address=127.0.0.1",
            # Fast enough for tests, still the real controllers: ReplicaSet/EndpointSlice syncs
            # are batched by at most this long.
            "--endpointslice-updates-batch-period=0s",
            "--v=1",
        ]
    if name == "kube-scheduler":
        return [
            str(b.kube_scheduler),
            f"--kubeconfig={info.kubeconfig}",
            f"--authentication-kubeconfig={info.kubeconfig}",
            f"--authorization-kubeconfig={info.kubeconfig}",
            "--leader-elect=false",
            "--secure-port=0",
            "--bind-address=127.0.0.1",
            "--v=1",
        ]
    if name == "kwok":
        return [
            str(b.kwok),
            f"--kubeconfig={info.kubeconfig}",
            f"--config={kwok_config(b, d)}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={NODE_ANNOTATION}=fake",
            f"--cidr={POD_CIDR}",
            f"--node-ip={NODE_IP}",
            # Without a node Lease kwok renews nothing and the Node goes NotReady after ~50 s.
            "--node-lease-duration-seconds=40",
        ]
    raise KeyError(name)


def kwok_config(b: Binaries, directory: Path) -> Path:
    """One multi-document config: kwok's default stages, as its module ships them."""
    out = directory / "kwok.yaml"
    docs = [p.read_text().strip() for p in sorted(b.kwok_stages.glob("*.yaml"))]
    out.write_text("\n---\n".join(docs) + "\n")
    return out


def node_manifest() -> str:
    """The fake Node: kwok's annotation (so kwok manages it), no NoSchedule taint."""
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE_NAME,
            "annotations": {NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": NODE_NAME,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
            },
        },
        "spec": {},
        "status": {
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "500"},
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "500"},
        },
    }
    return json.dumps(node)


def start(info: StackInfo, b: Binaries, spawn: Callable[[str, list[str]], int]) -> None:
    """Start the three controllers (``spawn(name, argv) -> pid``) and register the fake Node."""
    from devkit.devstack.controlplane import kubectl

    for name in COMPONENTS:
        cmd = argv(name, b, info)
        info.pids[name] = spawn(name, cmd)
        info.argv[name] = cmd
        info.save()
    kubectl(info, "apply", "--server-side", "-f", "-", input=node_manifest())
    kubectl(info, "wait", "--for", "condition=Ready", "--timeout", "60s", f"node/{NODE_NAME}")
