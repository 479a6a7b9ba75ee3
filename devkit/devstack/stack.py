"""The whole local stack (control plane + Prometheus) as one unit for the CLI, tests and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from devkit.devstack import controlplane
from devkit.devstack.controlplane import StackInfo
from devkit.devstack.prometheus import PrometheusServer


def up(directory: Path, *, prometheus: bool = True) -> StackInfo:
    directory = directory.resolve()
    info = controlplane.start_control_plane(directory)
    try:
        if prometheus:
            prom = PrometheusServer(directory / "prometheus", detach=True)
            prom.start()
            info.prometheus_url = prom.url
            info.pids["prometheus"] = prom.pid
            info.save()
    except BaseException:
        controlplane.stop_stack(directory)
        raise
    lines = [f"export KUBECONFIG={info.kubeconfig}"]
    if info.prometheus_url:
        lines.append(f"export PROMETHEUS_URL={info.prometheus_url}")
        lines.append(f"export CANARYD_PROMETHEUS__URL={info.prometheus_url}")
    (directory / "env").write_text("\n".join(lines) + "\n")
    return info


def down(directory: Path) -> None:
    controlplane.stop_stack(directory.resolve())


def status(directory: Path) -> dict[str, Any]:
    return controlplane.stack_status(directory.resolve())
