"""The route adapter's I/O half: read an HTTPRoute, and write exactly the ops ``canaryd.core.backends`` built.

Every write is one JSON patch guarded by a ``test`` of ``metadata.resourceVersion``, so a concurrent
edit makes the patch fail (``ConflictError``) instead of being overwritten.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from canaryd.core.backends import RouteRef, ref_of
from canaryd.kube import Api
from canaryd.kube.api import get_route, patch_route


class RouteClient:
    """Reads and patches HTTPRoutes; every patch is guarded by resourceVersion."""

    def __init__(self, api: Api, field_manager: str = "canaryd") -> None:
        self._api = api
        self.field_manager = field_manager

    async def get(self, ref: RouteRef) -> dict[str, Any]:
        return await get_route(self._api, ref.namespace, ref.name)

    async def patch(self, obj: Mapping[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
        """Apply ``ops`` if the route is still at the resourceVersion of ``obj`` (else ConflictError)."""
        ref = ref_of(obj)
        guarded = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": obj["metadata"]["resourceVersion"]},
            *ops,
        ]
        return await patch_route(self._api, ref.namespace, ref.name, guarded, field_manager=self.field_manager)
