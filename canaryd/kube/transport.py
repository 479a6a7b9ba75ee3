"""canaryd's own requests to the apiserver: plain JSON in and out, on three aiohttp sessions (lanes).

kubernetes_asyncio still loads the kubeconfig or the in-cluster config (its ``Configuration``) and signs
each request (``ApiClient.update_params_for_auth``: bearer tokens, refreshed for exec plugins and
rotating service-account tokens); client certificates, the CA, ``insecure-skip-tls-verify``,
``tls-server-name`` and the proxy are the ones its own REST client would use. What differs:

- no generated classes: the path is built here and the reply stays a dict, so the daemon never
  imports the API classes or the models (about 30 MB);
- requests share at most ``REQUEST_CONNECTIONS`` connections. The library's client opens up to 100,
  and routes stepping together keep all of them open: a TLS connection holds about 0.3 MB (asyncio's
  256 KiB read buffer, OpenSSL's state), 27 MB of a 104 MB daemon at 100 routes. 8 keep enough patches
  in flight for an apiserver on two cores: at 1,000 lockstep routes 8 were no slower than 16 (and 3 MB
  smaller at 100; docs/benchmarks.md, issue 15). Events, off the rollout's critical path, have
  ``EVENT_CONNECTIONS`` of their own, so they never hold a patch's slot; watches, which hold their
  connection for minutes, have theirs (one each);
- the environment (``*_proxy``, ``~/.netrc``) is read per request only when it says anything: with
  ``trust_env`` aiohttp asks a worker thread for proxies and netrc on every request.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import aiohttp
from kubernetes_asyncio.client.configuration import Configuration

REQUEST_CONNECTIONS = 8
EVENT_CONNECTIONS = 2
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=10)
WATCH_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)  # the server ends a watch (timeoutSeconds)
WATCH_READ_BUFFER = 2**21  # a watch line is one whole object; etcd's request limit is 1.5 MiB

Sign = Callable[[dict[str, str]], Awaitable[None]]
Lane = Literal["requests", "events", "watches"]


def tls_context(cfg: Configuration) -> ssl.SSLContext:
    """The TLS settings kubernetes_asyncio's REST client derives from the same configuration."""
    ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, keyfile=cfg.key_file)
    if not cfg.verify_ssl:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.disable_strict_ssl_verification:
        ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT
    return ctx


def environment_matters(environ: Mapping[str, str] | None = None, home: str | None = None) -> bool:
    """Whether proxies or netrc credentials come from the environment (aiohttp's ``trust_env``)."""
    env = os.environ if environ is None else environ
    if any(k.lower().endswith("_proxy") and v for k, v in env.items()) or env.get("NETRC"):
        return True
    return os.path.exists(os.path.join(home or os.path.expanduser("~"), ".netrc"))


class Transport:
    def __init__(self, cfg: Configuration, headers: Mapping[str, str], sign: Sign) -> None:
        self._host = str(cfg.host).rstrip("/")
        self._headers = {**headers, "Accept": "application/json"}
        self._sign = sign
        self._extra: dict[str, Any] = {}
        if cfg.proxy:
            self._extra["proxy"] = cfg.proxy
            if cfg.proxy_headers:
                self._extra["proxy_headers"] = cfg.proxy_headers
        if cfg.tls_server_name:
            self._extra["server_hostname"] = cfg.tls_server_name
        tls = tls_context(cfg)
        trust_env = environment_matters()

        def session(limit: int, **kw: Any) -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(limit=limit, ssl=tls)
            return aiohttp.ClientSession(connector=connector, trust_env=trust_env, **kw)

        self._lanes: dict[Lane, aiohttp.ClientSession] = {
            "requests": session(REQUEST_CONNECTIONS),
            "events": session(EVENT_CONNECTIONS),
            "watches": session(0, read_bufsize=WATCH_READ_BUFFER),  # 0: no limit, one connection per watch
        }

    async def send(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        lane: Lane = "requests",
    ) -> aiohttp.ClientResponse:
        """Send one request; the caller reads (or streams) and releases the response, whatever its status."""
        headers = dict(self._headers)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body, separators=(",", ":"))
        await self._sign(headers)
        return await self._lanes[lane].request(
            method,
            self._host + path,
            params=query,
            data=data,
            headers=headers,
            timeout=WATCH_TIMEOUT if lane == "watches" else REQUEST_TIMEOUT,
            **self._extra,
        )

    async def close(self) -> None:
        for session in self._lanes.values():
            await session.close()
