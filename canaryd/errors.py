"""One exception hierarchy. Messages say what was wrong, where, and what to do."""

from __future__ import annotations


class CanarydError(Exception):
    """Base of every error canaryd raises on purpose."""


class SpecError(CanarydError):
    """A ``canaryd.io/*`` annotation is invalid; the route is left untouched.

    ``annotation`` names the offending annotation so Events and status can point at it.
    """

    def __init__(self, annotation: str, message: str) -> None:
        super().__init__(f"{annotation}: {message}")
        self.annotation = annotation
        self.message = message


class RouteError(CanarydError):
    """The route cannot be rolled out as annotated (missing backend, no shared rule, ...)."""


class StateError(CanarydError):
    """The state annotation cannot be decoded (corrupt or from a newer canaryd)."""


class ConflictError(CanarydError):
    """Someone else changed the object between our read and our write."""


class NotFoundError(CanarydError):
    """The object does not exist (any more)."""


class ForbiddenError(CanarydError):
    """RBAC refused the call; the message names the verb and resource."""


class KubeError(CanarydError):
    """Any other failure talking to the Kubernetes API."""


class MetricsError(CanarydError):
    """Prometheus could not be queried or answered with something unusable."""


class DevstackError(CanarydError):
    """The local control plane could not be started or stopped."""
