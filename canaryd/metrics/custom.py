"""The ``custom:<name>`` signal: user PromQL templates from a YAML file.

File format (see config/metric-templates.yaml)::

    templates:
      <name>:
        requests: <PromQL returning one value: requests of {backend} in {window}>
        errors: <PromQL returning one value: failed requests of {backend} in {window}>
        latency_ms: <optional PromQL: the latency quantile of {backend}, milliseconds>

Each query is rendered twice, ``{backend}`` = the stable, then the canary. Variables:
{namespace} {route} {service} {port} {stable} {canary} {backend} {app_id} {window} {quantile}.
Every value is validated (DNS names, numbers) before substitution; anything else is refused.
An empty answer counts as 0 requests/errors and as "not measured" latency.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from canaryd.core.analysis import AnalysisTarget, BackendStats, Observation
from canaryd.errors import MetricsError
from canaryd.metrics import promql
from canaryd.metrics.prometheus import PrometheusClient

VARIABLES = frozenset(
    {"namespace", "route", "service", "port", "stable", "canary", "backend", "app_id", "window", "quantile"}
)
_KEYS = ("requests", "errors", "latency_ms")
# What ``custom:<name>`` accepts in canaryd.io/analysis (see canaryd.core.spec).
_TEMPLATE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9_]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Template:
    name: str
    requests: str
    errors: str
    latency_ms: str | None = None


def parse_templates(data: Any, *, source: str) -> dict[str, Template]:
    """Validate a loaded YAML document; errors name the file, template and key."""
    if not isinstance(data, Mapping) or not isinstance(data.get("templates"), Mapping):
        raise MetricsError(f"{source}: expected a mapping with a 'templates' key")
    out: dict[str, Template] = {}
    for name, body in data["templates"].items():
        where = f"{source}: template {name!r}"
        if not isinstance(name, str) or not _TEMPLATE_NAME.match(name):
            raise MetricsError(f"{where}: name must be lowercase letters, digits, '-' or '_'")
        if not isinstance(body, Mapping):
            raise MetricsError(f"{where}: expected a mapping with requests/errors[/latency_ms]")
        unknown = set(body) - set(_KEYS)
        if unknown:
            raise MetricsError(f"{where}: unknown keys {sorted(unknown)}; use {', '.join(_KEYS)}")
        for key in ("requests", "errors"):
            if not isinstance(body.get(key), str) or not body[key].strip():
                raise MetricsError(f"{where}: '{key}' query is required")
        if body.get("latency_ms") is not None and not isinstance(body["latency_ms"], str):
            raise MetricsError(f"{where}: 'latency_ms' must be a query string")
        for key in _KEYS:
            query = body.get(key)
            if isinstance(query, str):
                bad = promql.variables_in(query) - VARIABLES
                if bad:
                    raise MetricsError(
                        f"{where}.{key}: unknown variable(s) {', '.join('{' + b + '}' for b in sorted(bad))}; "
                        f"known: {', '.join('{' + v + '}' for v in sorted(VARIABLES))}"
                    )
        out[name] = Template(name, body["requests"], body["errors"], body.get("latency_ms"))
    return out


class TemplateStore:
    """Templates from ``custom_templates_file``, re-read when the file changes."""

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._loaded: tuple[float, dict[str, Template]] | None = None

    def get(self, name: str) -> Template:
        if not self._path:
            raise MetricsError(
                f"signal custom:{name} needs a templates file (PrometheusSettings.custom_templates_file)"
            )
        try:
            mtime = os.stat(self._path).st_mtime
            if self._loaded is None or self._loaded[0] != mtime:
                data = yaml.safe_load(Path(self._path).read_text())
                self._loaded = (mtime, parse_templates(data, source=self._path))
        except OSError as exc:
            raise MetricsError(f"cannot read metric templates {self._path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise MetricsError(f"metric templates {self._path} are not valid YAML: {exc}") from exc
        templates = self._loaded[1]
        if name not in templates:
            raise MetricsError(
                f"no metric template {name!r} in {self._path}; have: {', '.join(sorted(templates)) or 'none'}"
            )
        return templates[name]


def variables(target: AnalysisTarget) -> dict[str, str | None]:
    """Validated values for one route (``backend`` is filled per query)."""
    spec = target.spec
    return {
        "namespace": promql.safe_label("namespace", target.namespace),
        "route": promql.safe_name("route", target.route),
        "service": promql.safe_label("service", target.service),
        "port": promql.safe_port("port", target.port),
        "stable": promql.safe_label("stable", target.stable),
        "canary": promql.safe_label("canary", target.canary),
        "app_id": promql.safe_label("app_id", spec.app_id) if spec.app_id else None,
        "window": promql.duration(spec.window_s),
        "quantile": f"{spec.latency_quantile:g}",
        "backend": None,
    }


def render_queries(template: Template, target: AnalysisTarget) -> dict[str, dict[str, str]]:
    """``{backend: {key: promql}}`` for stable and canary; raises before any query is sent."""
    base = variables(target)
    out: dict[str, dict[str, str]] = {}
    for role, backend in (("stable", base["stable"]), ("canary", base["canary"])):
        values = {**base, "backend": backend}
        queries = {
            "requests": promql.render(template.requests, values, where=f"custom:{template.name}.requests"),
            "errors": promql.render(template.errors, values, where=f"custom:{template.name}.errors"),
        }
        if template.latency_ms:
            queries["latency_ms"] = promql.render(
                template.latency_ms, values, where=f"custom:{template.name}.latency_ms"
            )
        out[role] = queries
    return out


async def measure(client: PrometheusClient, template: Template, target: AnalysisTarget) -> Observation:
    rendered = render_queries(template, target)
    signal = f"custom:{template.name}"

    async def one(key: str, query: str) -> float | None:
        samples = await client.query(query)
        if len(samples) > 1:
            raise MetricsError(f"{signal}.{key} returned {len(samples)} series; wrap the query in sum(...)")
        return samples[0].value if samples else None

    async def backend(queries: dict[str, str]) -> tuple[BackendStats, int]:
        keys = list(queries)
        values = await asyncio.gather(*(one(k, queries[k]) for k in keys))
        got = dict(zip(keys, values, strict=True))
        found = int(got["requests"] is not None)  # the requests query answered a series
        return BackendStats(got["requests"] or 0.0, got["errors"] or 0.0, got.get("latency_ms")), found

    (stable, s_found), (canary, c_found) = await asyncio.gather(
        backend(rendered["stable"]), backend(rendered["canary"])
    )
    return Observation(signal, canary=canary, stable=stable, series=s_found + c_found)
