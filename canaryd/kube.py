"""The boundary to kubernetes_asyncio: client construction and error translation.

Other modules receive an ``ApiClient`` from here and get ``CanarydError`` subclasses back,
never ``ApiException``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from canaryd.errors import (
    CanarydError,
    ConflictError,
    ForbiddenError,
    KubeError,
    NotFoundError,
)

GATEWAY_GROUP = "gateway.networking.k8s.io"
GATEWAY_VERSION = "v1"
HTTPROUTES = "httproutes"


async def new_client(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """An ApiClient from ``kubeconfig``/``KUBECONFIG``/``~/.kube/config``, else in-cluster config."""
    path = kubeconfig or os.environ.get("KUBECONFIG")
    default = os.path.expanduser("~/.kube/config")  # noqa: ASYNC240 - once at start-up
    cfg = client.Configuration()
    if path or os.path.exists(default):  # noqa: ASYNC240
        try:
            await config.load_kube_config(config_file=path or default, context=context, client_configuration=cfg)
        except (config.ConfigException, OSError) as exc:
            raise KubeError(
                f"cannot load kubeconfig {path or default}: {exc}; pass --kubeconfig or set KUBECONFIG"
            ) from exc
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    else:
        raise KubeError(
            "no kubeconfig found (KUBECONFIG, --kubeconfig, ~/.kube/config) and not "
            "running in a pod; point canaryd at a cluster"
        )
    return client.ApiClient(configuration=cfg)


@asynccontextmanager
async def api_client(kubeconfig: str | None = None, context: str | None = None) -> AsyncIterator[client.ApiClient]:
    api = await new_client(kubeconfig, context)
    try:
        yield api
    finally:
        await api.close()


def translate(exc: BaseException, what: str) -> CanarydError:
    """Turn a client exception into our hierarchy; ``what`` says which call, e.g. 'patch httproute ns/name'."""
    if isinstance(exc, CanarydError):
        return exc
    if isinstance(exc, ApiException):
        reason = status_message(exc)
        if exc.status == 404:
            return NotFoundError(f"{what}: not found ({reason})")
        if exc.status == 409:
            return ConflictError(f"{what}: conflict ({reason})")
        if exc.status == 422 and "test operation" in reason.lower():
            return ConflictError(f"{what}: changed since read ({reason})")
        if exc.status == 403:
            return ForbiddenError(f"{what}: forbidden ({reason}); grant canaryd's ServiceAccount this permission")
        if exc.status == 401:
            return ForbiddenError(f"{what}: unauthorized ({reason}); check the credentials in your kubeconfig")
        return KubeError(f"{what}: HTTP {exc.status} ({reason})")
    if isinstance(exc, OSError | TimeoutError):
        return KubeError(f"{what}: cluster unreachable ({exc}); check the server in your kubeconfig")
    return KubeError(f"{what}: {exc!r}")


def status_message(exc: ApiException) -> str:
    try:
        body: Any = json.loads(exc.body) if exc.body else {}
        return str(body.get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)
