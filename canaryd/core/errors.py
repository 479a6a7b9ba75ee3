"""Errors of the pure core: a rollout that cannot proceed as annotated. Messages say what, where, what to do."""

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
