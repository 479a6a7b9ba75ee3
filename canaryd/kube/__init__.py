"""The Kubernetes boundary: the only package that imports kubernetes_asyncio (import-linter keeps it so).

Owns: client construction (kubeconfig or in-cluster), the error family's translation
(``canaryd.kube.errors``), the one watch primitive (``canaryd.kube.informer``), resource calls
returning plain dicts (``canaryd.kube.api``), the route adapter (``canaryd.kube.routes``), Events
and the Lease. Everything above it sees ``Api`` objects, dicts and ``canaryd.errors`` — never
``ApiException`` or generated models.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import yaml
from kubernetes_asyncio import client, config

from canaryd import __version__
from canaryd.errors import KubeError

GATEWAY_GROUP = "gateway.networking.k8s.io"
GATEWAY_VERSION = "v1"
HTTPROUTES = "httproutes"
USER_AGENT = f"canaryd/{__version__}"

Api = client.ApiClient


async def new_client(kubeconfig: str | None = None, context: str | None = None) -> Api:
    """An ApiClient from ``kubeconfig``/``KUBECONFIG``/``~/.kube/config``, else in-cluster config."""
    path = kubeconfig or os.environ.get("KUBECONFIG")
    default = os.path.expanduser("~/.kube/config")  # noqa: ASYNC240 - once at start-up
    cfg = client.Configuration()
    if path or os.path.exists(default):  # noqa: ASYNC240
        try:
            await config.load_kube_config(config_file=path or default, context=context, client_configuration=cfg)
        except Exception as exc:  # garbage files raise TypeError/KeyError from the loader, not ConfigException
            # One line: YAML errors span several; a wrong shape says nothing useful by itself.
            why = " ".join(str(exc).split()) if isinstance(exc, config.ConfigException | yaml.YAMLError) else ""
            raise KubeError(
                f"cannot load kubeconfig {path or default}: {why or 'not a kubeconfig'} "
                f"({type(exc).__name__}); pass --kubeconfig or set KUBECONFIG to a valid kubeconfig"
            ) from exc
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise KubeError(f"cannot load the in-cluster config: {exc}") from exc
    else:
        raise KubeError(
            "no kubeconfig found (KUBECONFIG, --kubeconfig, ~/.kube/config) and not "
            "running in a pod; point canaryd at a cluster"
        )
    api = client.ApiClient(configuration=cfg)
    api.user_agent = USER_AGENT
    return api


@asynccontextmanager
async def api_client(kubeconfig: str | None = None, context: str | None = None) -> AsyncIterator[Api]:
    api = await new_client(kubeconfig, context)
    try:
        yield api
    finally:
        await api.close()
