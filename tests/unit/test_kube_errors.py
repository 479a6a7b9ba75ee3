"""The error family is chosen from the API Status alone (pure: an ApiException built here, no server)."""

from __future__ import annotations

import json

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from canaryd.errors import ConflictError, ForbiddenError, GoneError, InvalidError, KubeError, NotFoundError
from canaryd.kube.errors import translate


def status(code: int, message: str, causes: list[dict[str, str]] | None = None) -> ApiException:
    exc = ApiException(status=code, reason="x")
    body: dict[str, object] = {"kind": "Status", "code": code, "message": message}
    if causes is not None:
        body["details"] = {"causes": causes}
    exc.body = json.dumps(body).encode()
    return exc


@pytest.mark.parametrize(
    ("exc", "family"),
    [
        (status(404, "not found"), NotFoundError),
        (status(409, "the object has been modified"), ConflictError),
        (status(410, "too old resource version"), GoneError),
        (status(403, 'cannot patch resource "httproutes"'), ForbiddenError),
        (status(401, "Unauthorized"), ForbiddenError),
        # A failed JSON-patch test on a custom resource: the real apiserver's generic text, no causes.
        (status(422, "the server rejected our request due to an error in our request"), ConflictError),
        (status(422, "testing value /metadata/resourceVersion failed"), ConflictError),
        (
            status(
                422,
                'HTTPRoute.gateway.networking.k8s.io "whoami" is invalid: metadata.annotations: Too long',
                [{"reason": "FieldValueTooLong", "field": "metadata.annotations"}],
            ),
            InvalidError,
        ),
        (status(500, "etcdserver: request timed out"), KubeError),
    ],
)
def test_family_from_status(exc: ApiException, family: type[KubeError]) -> None:
    err = translate(exc, "patch httproute ns/r")
    assert type(err) is family and err.status == exc.status
    assert "patch httproute ns/r" in str(err)
