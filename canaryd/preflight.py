"""``canaryd check``: everything that would stop a route's rollout, found before it starts.

Owns: ``admit()`` (the engine's own admission) on what one read of the cluster returns, plus what
needs I/O — the RBAC canaryd needs (SelfSubjectAccessReview), the canary's ready EndpointSlices and
one analysis round against Prometheus — and the ``Report`` they produce. Must not: write anything
to the cluster, or print — ``canaryd.commands.control`` renders the report.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from canaryd.core.admit import Admission, StaticView, admit
from canaryd.core.analysis import AnalysisTarget, Judgement, Observation, Verdict
from canaryd.core.backends import SERVICE_NAME_LABEL, RouteRef, backend_names, slice_ready
from canaryd.core.judge import judge_round
from canaryd.core.spec import CANARY
from canaryd.errors import CanarydError, ForbiddenError, NotFoundError
from canaryd.kube import GATEWAY_GROUP, HTTPROUTES, Api
from canaryd.kube.api import allowed, get_route, list_objects, service_slices
from canaryd.settings import Settings


@dataclass(frozen=True)
class Permission:
    group: str
    resource: str
    verb: str
    namespace: str  # "" = cluster scope

    def __str__(self) -> str:
        res = f"{self.resource}.{self.group}" if self.group else self.resource
        where = f"in namespace {self.namespace}" if self.namespace else "cluster-wide"
        return f"{self.verb} {res} {where}"


def required_permissions(route_namespace: str, lease_namespace: str) -> list[Permission]:
    """What the controller needs to roll out a route in ``route_namespace`` (see charts/canaryd RBAC)."""
    wanted: list[tuple[str, str, tuple[str, ...], str]] = [
        (GATEWAY_GROUP, HTTPROUTES, ("get", "list", "watch", "patch"), route_namespace),
        ("discovery.k8s.io", "endpointslices", ("list", "watch"), route_namespace),
        ("", "services", ("list", "watch"), route_namespace),
        ("", "events", ("create",), route_namespace),
        ("coordination.k8s.io", "leases", ("get", "create", "update"), lease_namespace),
    ]
    return [Permission(g, r, v, ns) for g, r, verbs, ns in wanted for v in verbs]


@dataclass(frozen=True)
class Finding:
    ok: bool
    check: str  # annotations | state | route | service | endpoints | rbac | analysis | intent
    message: str


@dataclass
class Report:
    route: RouteRef
    findings: list[Finding] = field(default_factory=list)
    judgements: list[Judgement] = field(default_factory=list)
    prometheus_url: str | None = None

    def ok(self, check: str, message: str) -> None:
        self.findings.append(Finding(True, check, message))

    def problem(self, check: str, message: str) -> None:
        self.findings.append(Finding(False, check, message))

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]


async def preflight(
    api: Api,
    ref: RouteRef,
    *,
    settings: Settings,
    now: datetime,
    prometheus_url: str | None = None,
    timeout_s: float = 30.0,
) -> Report:
    """Run every check; raises only when the route is missing or the cluster cannot be reached."""
    report = Report(ref)
    await _check_rbac(api, ref.namespace, settings.lease_namespace, report)
    try:
        obj = await get_route(api, ref.namespace, ref.name)
    except NotFoundError:
        raise NotFoundError(
            f"httproute {ref} not found; check the name and namespace "
            f"(canaryd status -n {ref.namespace} lists the managed routes)"
        ) from None
    except ForbiddenError as exc:
        report.problem("route", f"cannot read httproute {ref}: {exc}")
        return report
    annotations: Mapping[str, str] = obj["metadata"].get("annotations") or {}
    if CANARY not in annotations:
        report.problem(
            "annotations",
            f"httproute {ref} has no {CANARY} annotation; set it to the backendRef to roll out, e.g. "
            f"kubectl annotate httproute {ref.name} -n {ref.namespace} {CANARY}=<backend>",
        )
        return report
    view = await _view(api, obj, report)
    adm = admit(obj, view, settings.defaults, now)
    _report_admission(adm, report)
    if adm.spec is not None:
        await _check_endpoints(api, ref.namespace, adm.spec.canary, report)
    if adm.spec is not None and adm.spec.analysis.enabled:
        if adm.pair is None:
            report.problem("analysis", "analysis not run: the backend pair could not be resolved (see above)")
        else:
            await _check_analysis(ref, adm, settings, prometheus_url, timeout_s, report)
    return report


async def _view(api: Api, obj: Mapping[str, Any], report: Report) -> StaticView:
    """The route's backend Services as admission sees them (ready endpoints are checked separately)."""
    ns = obj["metadata"]["namespace"]
    names = backend_names(obj)
    found: dict[tuple[str, str], bool] = {}
    for name in sorted(names):
        try:  # list, not get: the controller's (and the chart's) RBAC has list/watch on Services only
            items, _ = await list_objects(api, "services", ns, name=name)
            if items:
                found[(ns, name)] = True
        except ForbiddenError as exc:
            found[(ns, name)] = True  # cannot tell: do not report it missing, report the permission
            report.problem("service", str(exc))
    return StaticView(found)


def _report_admission(adm: Admission, report: Report) -> None:
    for p in adm.problems:
        report.problem(p.check, p.message)
    spec = adm.spec
    if spec is not None and not any(p.check == "annotations" for p in adm.problems):
        signals = ",".join(spec.analysis.signals) or "none (time-based)"
        report.ok(
            "annotations",
            f"canary {spec.canary}, steps {','.join(map(str, spec.steps))} every {spec.interval_s:g}s, "
            f"analysis {signals}",
        )
    if adm.pair is not None:
        rules = ", ".join(str(r.rule) for r in adm.pair.rules)
        parent = f"; parent Service {adm.parent}" if adm.parent else ""
        report.ok("route", f"stable {adm.pair.stable} and canary {adm.pair.canary} share rule(s) {rules}{parent}")
        if not any(p.check == "service" for p in adm.problems):
            report.ok("service", f"Services {adm.pair.stable} and {adm.pair.canary} exist")


async def _check_rbac(api: Api, namespace: str, lease_namespace: str, report: Report) -> None:
    perms = required_permissions(namespace, lease_namespace)

    async def may(p: Permission) -> bool | str:
        try:
            return await allowed(api, group=p.group, resource=p.resource, verb=p.verb, namespace=p.namespace)
        except ForbiddenError as exc:
            return str(exc)

    results = await asyncio.gather(*(may(p) for p in perms))
    missing = [p for p, ok in zip(perms, results, strict=True) if ok is False]
    broken = [r for r in results if isinstance(r, str)]
    if broken:
        report.problem("rbac", f"cannot check RBAC: {broken[0]}")
        return
    for p in missing:
        report.problem("rbac", f"missing permission: {p}; grant it to the identity canaryd runs as")
    if not missing:
        report.ok("rbac", f"all {len(perms)} permissions canaryd needs are granted")


async def _check_endpoints(api: Api, namespace: str, canary: str, report: Report) -> None:
    try:
        slices = await service_slices(api, namespace, canary)
    except ForbiddenError as exc:
        report.problem("endpoints", str(exc))
        return
    ready = [s for s in slices if slice_ready(s)]
    if ready:
        report.ok("endpoints", f"canary {canary} has ready endpoints ({len(ready)} EndpointSlice(s))")
    elif slices:
        report.problem(
            "endpoints",
            f"canary {canary} has no ready endpoints ({len(slices)} EndpointSlice(s), none ready); "
            "the rollout would wait and then roll back — check its pods",
        )
    else:
        report.problem(
            "endpoints",
            f"canary {canary} has no EndpointSlices (label {SERVICE_NAME_LABEL}={canary}); "
            "deploy its pods or fix the Service selector",
        )


async def _check_analysis(
    ref: RouteRef,
    adm: Admission,
    settings: Settings,
    prometheus_url: str | None,
    timeout_s: float,
    report: Report,
) -> None:
    from canaryd.metrics import PrometheusAnalyzer

    assert adm.spec is not None and adm.pair is not None
    spec = adm.spec
    prom = settings.prometheus.model_copy(update={"url": prometheus_url} if prometheus_url else {})
    report.prometheus_url = prom.url
    target = AnalysisTarget(
        namespace=ref.namespace,
        route=ref.name,
        service=adm.parent or "",
        port=int(spec.port or adm.pair.port or 80),
        stable=adm.pair.stable,
        canary=adm.pair.canary,
        spec=replace(spec.analysis, window_s=min(spec.analysis.window_s, spec.interval_s)),  # the last interval
    )
    analyzer = PrometheusAnalyzer(prom)
    try:
        observations = await asyncio.wait_for(analyzer.analyze(target), timeout_s)
    except TimeoutError:
        why = f"no answer from Prometheus at {prom.url} within {timeout_s:g}s"
        observations = [Observation(s, None, None, error=why) for s in spec.analysis.signals]
    except CanarydError as exc:
        observations = [Observation(s, None, None, error=str(exc)) for s in spec.analysis.signals]
    finally:
        await analyzer.aclose()
    # The judge the engine uses, on one window as if the rollout started now.
    n = len(spec.analysis.signals)
    judgements = [judge_round(o, spec.analysis, signals=n)[0] for o in observations]
    report.judgements = list(judgements)
    for j in judgements:
        if j.verdict == Verdict.ERROR:
            report.problem(
                "analysis",
                f"signal {j.signal}: {j.reason}; check --prometheus-url / CANARYD_PROMETHEUS__URL and that "
                "Prometheus is up",
            )
        else:
            report.ok("analysis", f"signal {j.signal} measured; the judge would say {j.verdict.value} now: {j.reason}")
