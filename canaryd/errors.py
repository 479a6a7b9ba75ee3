"""Errors at canaryd's boundaries. The core's errors (spec, route, state) live in ``canaryd.core.errors``;
the Kubernetes family is built once, in ``canaryd.kube.translate``, from the API ``Status``.
"""

from __future__ import annotations

from typing import Any

from canaryd.core.errors import CanarydError, RouteError, SpecError, StateError

__all__ = [
    "CanarydError",
    "ConflictError",
    "ForbiddenError",
    "GoneError",
    "InvalidError",
    "KubeError",
    "MetricsError",
    "NotFoundError",
    "RouteError",
    "SpecError",
    "StateError",
]


class KubeError(CanarydError):
    """A failure talking to the Kubernetes API; ``status`` is the API Status (HTTP code) when there was one.

    Transient unless a subclass says otherwise: callers retry with backoff.
    """

    def __init__(self, message: str, *, status: int | None = None, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body or {}


class ConflictError(KubeError):
    """Someone else changed the object between our read and our write (409, or a failed JSON-patch ``test``)."""


class NotFoundError(KubeError):
    """The object does not exist (any more)."""


class ForbiddenError(KubeError):
    """RBAC (403) or authentication (401) refused the call; the message names the verb and resource."""


class InvalidError(KubeError):
    """The server refused the request as invalid (422 other than a failed ``test``): retrying cannot help."""


class GoneError(KubeError):
    """410: the resourceVersion is too old; relist."""


class MetricsError(CanarydError):
    """Prometheus could not be queried or answered with something unusable.

    The message is one line, cause first ("Prometheus at http://…: connection refused"); the PromQL
    that failed, when there was one, is kept in ``query`` for structured logs, never in the message.
    """

    def __init__(self, message: str, *, query: str | None = None) -> None:
        super().__init__(message)
        self.query = query
