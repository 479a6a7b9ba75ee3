"""Fixtures over the same code as ``canaryd devstack``: one real control plane per session.

Nothing here skips: a missing binary or server fails the run with the message that says
what to install.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes_asyncio import client

from canaryd.kube import new_client
from devkit.devstack import controlplane
from devkit.devstack.controlplane import StackInfo

pytest_plugins = ["tests.plugin_prometheus", "tests.daemons"]

# pytest-xdist's workers export LINES=24 and COLUMNS=80; the CLI's children would take them over the size
# of the terminal a test gives them (shutil.get_terminal_size reads the environment first).
for _var in ("LINES", "COLUMNS"):
    os.environ.pop(_var, None)


@dataclass(frozen=True)
class Stack:
    info: StackInfo
    kubeconfig: Path
    bin_dir: Path
    dir: Path

    @property
    def server(self) -> str:
        return self.info.server

    def kubectl(self, *args: str, input: str | None = None, kubeconfig: str | None = None, check: bool = True) -> str:
        return controlplane.kubectl(self.info, *args, input=input, kubeconfig=kubeconfig, check=check).stdout

    def sa_kubeconfig(self, namespace: str, service_account: str) -> Path:
        out = self.dir / f"sa-{namespace}-{service_account}.kubeconfig"
        return controlplane.mint_sa_kubeconfig(self.info, namespace, service_account, out)


@contextmanager
def fresh_stack(prefix: str = "canaryd-stack-") -> Iterator[Stack]:
    """A control plane of its own in a temporary directory, stopped and removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    info = controlplane.start_control_plane(directory)
    try:
        yield Stack(info=info, kubeconfig=Path(info.kubeconfig), bin_dir=Path(info.bin_dir), dir=directory)
    finally:
        controlplane.stop_stack(directory)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with fresh_stack() as s:
        yield s


@pytest.fixture(scope="session")
async def api(stack: Stack) -> AsyncIterator[client.ApiClient]:
    c = await new_client(str(stack.kubeconfig))
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def namespace(api: client.ApiClient) -> AsyncIterator[str]:
    name = f"t-{secrets.token_hex(4)}"
    core = client.CoreV1Api(api)
    await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    # Left for the session's end (when the whole control plane goes): deleting it here would
    # make the namespace controller race the test's own teardown of daemons and watches.


@pytest.fixture
def own_stack() -> Iterator[Stack]:
    """A control plane of the test's own, for tests that kill or break it (never the session's)."""
    with fresh_stack("canaryd-own-") as s:
        yield s


@pytest.fixture
async def own_api(own_stack: Stack) -> AsyncIterator[client.ApiClient]:
    api = await new_client(str(own_stack.kubeconfig))
    try:
        yield api
    finally:
        await api.close()
