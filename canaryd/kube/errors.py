"""The one place where client exceptions become canaryd's Kubernetes error family (``canaryd.errors``).

Chosen from the API ``Status`` once, here: 404 not found, 409 conflict, 410 gone, 401/403 forbidden,
422 invalid — except a failed JSON-patch ``test`` (the route changed since it was read), which is a
conflict. Everything else, including dropped connections and truncated streams, is a transient
``KubeError`` that callers retry.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException

from canaryd.errors import (
    CanarydError,
    ConflictError,
    ForbiddenError,
    GoneError,
    InvalidError,
    KubeError,
    NotFoundError,
)

# What the apiserver says when a JSON-patch ``test`` op does not match (json-patch's error text).
_TEST_FAILED = ("testing value", "test operation", "test failed")


def status_body(exc: ApiException) -> dict[str, Any]:
    try:
        body: Any = json.loads(exc.body) if exc.body else {}
    except (ValueError, TypeError):
        return {}
    return body if isinstance(body, dict) else {}


def status_message(exc: ApiException) -> str:
    return str(status_body(exc).get("message") or exc.reason)


def _is_failed_test(body: dict[str, Any], reason: str) -> bool:
    """A failed JSON-patch ``test`` op: the apiserver answers 422 with json-patch's text, or — for custom
    resources — only the generic "rejected our request" and no field causes. A validation error names
    the object ("... is invalid: metadata.annotations: Too long") and lists its causes."""
    text = reason.lower()
    if any(t in text for t in _TEST_FAILED):
        return True
    details = body.get("details") or {}
    causes = details.get("causes") if isinstance(details, dict) else None
    return not causes and " is invalid" not in text


def translate(exc: BaseException, what: str) -> CanarydError:
    """Turn a client exception into our family; ``what`` says which call, e.g. 'patch httproute ns/name'."""
    if isinstance(exc, CanarydError):
        return exc
    if isinstance(exc, ApiException):
        return _from_status(exc, what)
    if isinstance(exc, ConfigException):
        return KubeError(f"{what}: bad kubeconfig ({exc}); pass --kubeconfig or set KUBECONFIG")
    if isinstance(exc, aiohttp.ClientError | OSError | TimeoutError):
        return KubeError(f"{what}: cluster unreachable ({type(exc).__name__}: {exc}); retrying")
    return KubeError(f"{what}: {exc!r}")


def _from_status(exc: ApiException, what: str) -> KubeError:
    body = status_body(exc)
    reason = status_message(exc)
    code = int(exc.status or 0)
    kw: dict[str, Any] = {"status": code, "body": body}
    if code == 404:
        return NotFoundError(f"{what}: not found ({reason})", **kw)
    if code == 409:
        return ConflictError(f"{what}: conflict ({reason})", **kw)
    if code == 410:
        return GoneError(f"{what}: gone ({reason})", **kw)
    if code == 422 and _is_failed_test(body, reason):
        return ConflictError(f"{what}: changed since read ({reason})", **kw)
    if code == 422:
        return InvalidError(f"{what}: refused as invalid ({reason})", **kw)
    if code == 403:
        return ForbiddenError(f"{what}: forbidden ({reason}); grant canaryd's ServiceAccount this permission", **kw)
    if code == 401:
        return ForbiddenError(f"{what}: unauthorized ({reason}); check the credentials in your kubeconfig", **kw)
    return KubeError(f"{what}: HTTP {code} ({reason})", **kw)
