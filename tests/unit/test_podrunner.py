"""Pods as endpoints, pure: which Pods get a process, and how a slice endpoint (podIP, port) maps
to it. The processes themselves run in tests/integration/test_dataplane.py."""

from __future__ import annotations

from typing import Any

from devkit.demo.podrunner import (
    PodInstance,
    container_flags,
    image_name,
    pod_instance,
    wanted_instances,
    whoami_argv,
)
from devkit.demo.routing import Endpoint, PodAddress, build_table, pod_endpoint


def pod(
    name: str,
    ip: str | None = "10.244.0.5",
    *,
    args: list[str] | None = None,
    phase: str = "Running",
    node: str | None = "kwok-node-0",
    image: str = "traefik/whoami:v1.11",
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": f"uid-{name}"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    spec: dict[str, Any] = {"containers": [{"name": "whoami", "image": image, "args": args or ["--name=v1"]}]}
    if node:
        spec["nodeName"] = node
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "spec": spec, "status": status}


def test_which_pods_get_a_process() -> None:
    inst = pod_instance(pod("whoami-v3-abc", args=["--name=v3", "--port=8080"]))
    assert inst == PodInstance(
        uid="uid-whoami-v3-abc", name="whoami-v3-abc", ip="10.244.0.5", whoami_name="v3", port=8080
    )
    assert pod_instance(pod("p", phase="Pending")) is None
    assert pod_instance(pod("p", ip=None)) is None  # Running without an IP yet
    assert pod_instance(pod("p", node=None)) is None  # not bound to a Node
    assert pod_instance(pod("p", deleting=True)) is None  # the kubelet would be stopping it
    assert pod_instance(pod("p", image="nginx:1.27")) is None
    assert pod_instance(pod("p"), node="kwok-node-0") is not None
    assert pod_instance(pod("p"), node="another-node") is None
    assert set(wanted_instances([pod("a"), pod("b", phase="Succeeded"), pod("c")])) == {"uid-a", "uid-c"}


def test_container_flags_follow_traefik_whoami() -> None:
    def flags(args: list[str], env: dict[str, str] | None = None) -> tuple[str, int, tuple[str, ...]]:
        c: dict[str, Any] = {"args": args, "env": [{"name": k, "value": v} for k, v in (env or {}).items()]}
        return container_flags(c)

    assert flags(["--name=v1", "--port=80"]) == ("v1", 80, ())
    assert flags(["-name", "v2", "-port", "8080"]) == ("v2", 8080, ())  # Go's flag syntax
    assert flags([]) == ("", 80, ())  # traefik/whoami's defaults
    assert flags([], {"WHOAMI_NAME": "e", "WHOAMI_PORT_NUMBER": "9090"}) == ("e", 9090, ())
    assert flags(["--port=81"], {"WHOAMI_PORT_NUMBER": "9090"}) == ("", 81, ())  # the flag wins
    assert flags(["--name=v3", "--error-ratio=0.1", "--verbose"]) == ("v3", 80, ("--error-ratio=0.1",))
    assert image_name("registry.local:5000/traefik/whoami:v1.11@sha256:abc") == "whoami"


def test_process_argv_answers_as_the_pod() -> None:
    inst = PodInstance(uid="u", name="whoami-v1-x", ip="10.244.0.7", whoami_name="v1", port=80)
    argv = whoami_argv(inst, "python")
    assert argv[:3] == ["python", "-m", "devkit.demo.whoami"]
    assert {"--name=v1", "--port=0", "--hostname=whoami-v1-x", "--ip=10.244.0.7", "--exit-with-parent"} <= set(argv)


def test_slice_endpoint_to_pod_process() -> None:
    ready = PodAddress(pod="whoami-v1-x", port=80, local_port=41234)
    assert pod_endpoint("10.244.0.5", 80, ready) == Endpoint("127.0.0.1", 41234, address="10.244.0.5:80")
    refused = pod_endpoint("10.244.0.5", 80, PodAddress(pod="whoami-v3-x", port=8080, local_port=41235))
    assert refused is not None and refused.refused and refused.address == "10.244.0.5:80"
    assert pod_endpoint("10.244.0.5", 80, PodAddress(pod="starting", port=80, local_port=None)) is None
    assert pod_endpoint("10.244.0.5", 80, None) is None


def controller_slice(service: str, *ips: str, ready: bool = True) -> dict[str, Any]:
    """An IPv4 slice as the EndpointSlice controller writes it for the seed's Services."""
    return {
        "metadata": {"name": f"{service}-abcde", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip in ips],
    }


def service(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}


def test_the_seeds_bad_release_in_the_table() -> None:
    route = {
        "metadata": {"name": "whoami", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "whoami", "port": 80}],
            "rules": [{"backendRefs": [{"name": "whoami-v1", "port": 80}, {"name": "whoami-v3", "port": 80}]}],
        },
    }
    pods = {
        "10.244.0.1": PodAddress(pod="whoami-v1-a", port=80, local_port=41001),
        "10.244.0.2": PodAddress(pod="whoami-v1-b", port=80, local_port=None),  # still starting
        "10.244.0.3": PodAddress(pod="whoami-v3-a", port=8080, local_port=41003),
    }
    refused: set[str] = set()
    table = build_table(
        "demo",
        [route],
        [service("whoami-v1"), service("whoami-v3")],
        [
            controller_slice("whoami-v1", "10.244.0.1", "10.244.0.2", "10.244.9.9"),
            controller_slice("whoami-v3", "10.244.0.3"),
        ],
        pods=pods,
        refused=refused,
    )
    assert table.endpoints[("whoami-v1", 80)] == (Endpoint("127.0.0.1", 41001, address="10.244.0.1:80"),)
    (v3,) = table.endpoints[("whoami-v3", 80)]
    assert v3.refused and v3.describe() == "10.244.0.3:80 (nothing listens there: connection refused)"
    assert refused == {"whoami-v1:10.244.9.9"}  # an IP no Pod of ours has: ignored, logged once
