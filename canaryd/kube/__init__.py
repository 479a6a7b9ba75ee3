"""The Kubernetes boundary: the only package that imports kubernetes_asyncio (import-linter keeps it so).

Owns: client construction (kubeconfig or in-cluster), the error family's translation
(``canaryd.kube.errors``), the one watch primitive (``canaryd.kube.informer``), resource calls
returning plain dicts (``canaryd.kube.api``), the route adapter (``canaryd.kube.routes``), Events
and the Lease. Everything above it sees ``Api`` objects, dicts and ``canaryd.errors`` — never
``ApiException`` or generated models.

The daemon's calls (lists, watches, route reads and patches, Events) go through ``Api.transport``
(``canaryd.kube.transport``: JSON in and out); the library's lazy stand-ins (``canaryd.kube.lazy``)
keep its generated API classes and models out of the process until something typed asks for one.
"""

from __future__ import annotations

# First, before anything imports kubernetes_asyncio (see canaryd.kube.lazy).
from canaryd.kube import lazy

lazy.install()

import os  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402

import yaml  # noqa: E402
from kubernetes_asyncio import config  # noqa: E402
from kubernetes_asyncio.client.api_client import ApiClient  # noqa: E402
from kubernetes_asyncio.client.configuration import Configuration  # noqa: E402

from canaryd import __version__  # noqa: E402
from canaryd.errors import KubeError  # noqa: E402
from canaryd.kube.transport import Transport  # noqa: E402

GATEWAY_GROUP = "gateway.networking.k8s.io"
GATEWAY_VERSION = "v1"
HTTPROUTES = "httproutes"
USER_AGENT = f"canaryd/{__version__}"


class Api(ApiClient):
    """kubernetes_asyncio's ApiClient (typed calls: the CLI, the Lease, tests) plus canaryd's own JSON
    request path, ``transport``, which shares its configuration, auth and User-Agent."""

    _transport: Transport | None = None

    @property
    def transport(self) -> Transport:
        if self._transport is None:  # made on first use, inside the running loop
            self._transport = Transport(self.configuration, self.default_headers, self._sign)
        return self._transport

    async def _sign(self, headers: dict[str, str]) -> None:
        await self.update_params_for_auth(headers, [], ["BearerToken"])

    async def close(self) -> None:
        await super().close()
        if self._transport is not None:
            await self._transport.close()
            self._transport = None


async def new_client(kubeconfig: str | None = None, context: str | None = None) -> Api:
    """An ApiClient from ``kubeconfig``/``KUBECONFIG``/``~/.kube/config``, else in-cluster config."""
    path = kubeconfig or os.environ.get("KUBECONFIG")
    default = os.path.expanduser("~/.kube/config")  # noqa: ASYNC240 - once at start-up
    cfg = Configuration()
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
    api = Api(configuration=cfg)
    api.user_agent = USER_AGENT
    return api


@asynccontextmanager
async def api_client(kubeconfig: str | None = None, context: str | None = None) -> AsyncIterator[Api]:
    api = await new_client(kubeconfig, context)
    try:
        yield api
    finally:
        await api.close()
