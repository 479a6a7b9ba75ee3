"""``canaryd check``: everything that would stop a route's rollout, found before it starts.

Owns: ``admit()`` (the engine's own admission) on what one read of the cluster returns, plus what
needs I/O — the RBAC the daemon uses, where it uses it (SelfSubjectAccessReview), the canary's
ready EndpointSlices and one analysis round against Prometheus — and the ``Report`` they produce,
with its ``-o json`` document. A dry run applies annotation values in memory only: the same
``admit()`` sees them, nothing is written. Must not: write anything to the cluster, or print —
``canaryd.commands.control`` renders the report.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from canaryd.core.admit import Admission, StaticView, admit
from canaryd.core.analysis import AnalysisTarget, BackendStats, Judgement, Observation, Verdict
from canaryd.core.backends import SERVICE_NAME_LABEL, RouteRef, backend_names, slice_ready
from canaryd.core.judge import judge_round
from canaryd.core.spec import CANARY
from canaryd.errors import CanarydError, ForbiddenError, NotFoundError
from canaryd.hooks.config import catalog as hook_catalog
from canaryd.kube import GATEWAY_GROUP, HTTPROUTES, Api
from canaryd.kube.api import allowed, get_route, list_objects, service_slices
from canaryd.settings import Settings

API_VERSION = "canaryd.io/v1"

# Which object of charts/canaryd/templates/rbac.yaml grants a permission, as `kubectl get` names it
# (<fullname> is the release's full name, e.g. "<release>-canaryd"). test_check_dryrun.py renders
# the chart and proves each claim, in both rbac scopes.
Grant = Literal["rules", "cluster-rules", "lease"]
CHART_GRANTS: dict[Grant, str] = {
    "rules": "ClusterRole <fullname> (rbac.scope=cluster) or Role <fullname> in each of rbac.namespaces "
    "(rbac.scope=namespaced)",
    "cluster-rules": "ClusterRole <fullname> (rbac.scope=cluster only: a namespaced install watches "
    "rbac.namespaces; say so with --watch-namespaces)",
    "lease": "Role <fullname>-leader-election in the release namespace (leaderElection.enabled; get and "
    "update only on the Lease named leaderElection.leaseName)",
}
WATCHED = ((GATEWAY_GROUP, HTTPROUTES), ("discovery.k8s.io", "endpointslices"), ("", "services"))


@dataclass(frozen=True)
class Permission:
    group: str
    resource: str
    verb: str
    namespace: str  # "" = cluster scope
    name: str = ""  # one object (what a rule limited by resourceNames needs); "" = any
    grant: Grant = "rules"

    def __str__(self) -> str:
        res = f"{self.resource}.{self.group}" if self.group else self.resource
        obj = f" {self.name}" if self.name else ""
        where = f"in namespace {self.namespace}" if self.namespace else "cluster-wide"
        return f"{self.verb} {res}{obj} {where}"


def required_permissions(route_namespace: str, settings: Settings) -> list[Permission]:
    """Exactly the calls the daemon makes for a route in ``route_namespace``, where it makes them:
    list/watch in each watched namespace (cluster-wide when it watches all), get/patch of the route
    and Events in the route's namespace, and the Lease (when leader election is on)."""
    out = [
        Permission(group, resource, verb, ns, grant="rules" if ns else "cluster-rules")
        for ns in settings.namespaces or [""]
        for group, resource in WATCHED
        for verb in ("list", "watch")
    ]
    out += [Permission(GATEWAY_GROUP, HTTPROUTES, verb, route_namespace) for verb in ("get", "patch")]
    out.append(Permission("", "events", "create", route_namespace))
    if settings.leader_election:
        lease_ns, lease = settings.lease_namespace, settings.lease_name
        out.append(Permission("coordination.k8s.io", "leases", "create", lease_ns, grant="lease"))
        out += [
            Permission("coordination.k8s.io", "leases", verb, lease_ns, lease, grant="lease")
            for verb in ("get", "update")
        ]
    return out


@dataclass(frozen=True)
class Finding:
    ok: bool
    check: str  # annotations | state | route | service | endpoints | rbac | analysis | intent
    message: str


@dataclass(frozen=True)
class SignalResult:
    """One signal's round: the judge's word on it and how many series Prometheus had."""

    judgement: Judgement
    series: int | None = None


@dataclass
class Report:
    route: RouteRef
    findings: list[Finding] = field(default_factory=list)
    signals: list[SignalResult] = field(default_factory=list)
    prometheus_url: str | None = None
    dry_run: dict[str, str] | None = None  # the annotations applied in memory, when a dry run

    def ok(self, check: str, message: str) -> None:
        self.findings.append(Finding(True, check, message))

    def problem(self, check: str, message: str) -> None:
        self.findings.append(Finding(False, check, message))

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    @property
    def judgements(self) -> list[Judgement]:
        return [s.judgement for s in self.signals]

    def document(self) -> dict[str, Any]:
        """The ``-o json`` document (docs/check-schema.json): fields are added in v1, never renamed."""
        return {
            "apiVersion": API_VERSION,
            "kind": "CheckReport",
            "namespace": self.route.namespace,
            "route": self.route.name,
            "dryRun": None if self.dry_run is None else {"annotations": dict(self.dry_run)},
            "ok": not self.problems,
            "problems": len(self.problems),
            "findings": [{"check": f.check, "ok": f.ok, "message": f.message} for f in self.findings],
            "analysis": None
            if not self.signals
            else {"prometheus": self.prometheus_url, "signals": [_signal_doc(s) for s in self.signals]},
        }


def _stats_doc(s: BackendStats | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {"requests": s.requests, "successRate": s.success_rate, "latencyMs": s.latency_ms}


def _signal_doc(s: SignalResult) -> dict[str, Any]:
    j = s.judgement
    return {
        "signal": j.signal,
        "verdict": j.verdict.value,
        "reason": j.reason,
        "series": s.series,
        "canary": _stats_doc(j.canary),
        "stable": _stats_doc(j.stable),
    }


async def preflight(
    api: Api,
    ref: RouteRef,
    *,
    settings: Settings,
    now: datetime,
    prometheus_url: str | None = None,
    timeout_s: float = 30.0,
    dry_run: Mapping[str, str] | None = None,
) -> Report:
    """Run every check; raises only when the route is missing or the cluster cannot be reached.

    ``dry_run``: full annotation keys and values laid over the route's own, in memory only.
    """
    report = Report(ref, dry_run=None if dry_run is None else dict(dry_run))
    await _check_rbac(api, ref.namespace, settings, report)
    _check_watched(ref, settings, report)
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
    await _check_selected(api, ref, settings, report)
    obj = _with_annotations(obj, dry_run or {})
    annotations: Mapping[str, str] = obj["metadata"].get("annotations") or {}
    if CANARY not in annotations:
        report.problem(
            "annotations",
            f"httproute {ref} has no {CANARY} annotation; preflight a rollout without writing anything with "
            f"canaryd check {ref.name} -n {ref.namespace} --canary <backend>, then start it with "
            f"kubectl annotate httproute {ref.name} -n {ref.namespace} {CANARY}=<backend>",
        )
        return report
    view = await _view(api, obj, report)
    adm = admit(obj, view, settings.defaults, now, hook_catalog(settings.hooks))
    _report_admission(adm, report)
    if adm.spec is not None:
        await _check_endpoints(api, ref.namespace, adm.spec.canary, report)
    if adm.spec is not None and adm.spec.analysis.enabled:
        if adm.pair is None:
            report.problem("analysis", "analysis not run: the backend pair could not be resolved (see above)")
        else:
            await _check_analysis(ref, adm, settings, prometheus_url, timeout_s, report)
    return report


def _with_annotations(obj: dict[str, Any], values: Mapping[str, str]) -> dict[str, Any]:
    """A copy of the route with ``values`` laid over its annotations (the dry run: never written)."""
    if not values:
        return obj
    meta = obj["metadata"]
    return {**obj, "metadata": {**meta, "annotations": {**(meta.get("annotations") or {}), **values}}}


def _check_watched(ref: RouteRef, settings: Settings, report: Report) -> None:
    if settings.namespaces and ref.namespace not in settings.namespaces:
        report.problem(
            "route",
            f"canaryd watches only namespace(s) {', '.join(settings.namespaces)} (CANARYD_NAMESPACES, "
            f"--watch-namespaces): it would never see httproute {ref}",
        )


async def _check_selected(api: Api, ref: RouteRef, settings: Settings, report: Report) -> None:
    """With CANARYD_LABEL_SELECTOR the daemon sees only the routes it selects: does it select this one?"""
    selector = settings.label_selector
    if not selector:
        return
    try:  # the apiserver applies the selector, so its grammar is the daemon's
        items, _ = await list_objects(api, "httproutes", ref.namespace, label_selector=selector, name=ref.name)
    except CanarydError as exc:
        report.problem("route", f"cannot tell whether label selector {selector!r} selects httproute {ref}: {exc}")
        return
    if not items:
        report.problem(
            "route",
            f"canaryd watches only routes matching label selector {selector!r} (CANARYD_LABEL_SELECTOR): "
            f"it would never see httproute {ref}; label the route to match",
        )


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


async def _check_rbac(api: Api, namespace: str, settings: Settings, report: Report) -> None:
    perms = required_permissions(namespace, settings)

    async def may(p: Permission) -> bool | str:
        try:
            return await allowed(
                api, group=p.group, resource=p.resource, verb=p.verb, namespace=p.namespace, name=p.name or None
            )
        except ForbiddenError as exc:
            return str(exc)

    results = await asyncio.gather(*(may(p) for p in perms))
    missing = [p for p, ok in zip(perms, results, strict=True) if ok is False]
    broken = [r for r in results if isinstance(r, str)]
    if broken:
        report.problem("rbac", f"cannot check RBAC: {broken[0]}")
        return
    for p in missing:
        report.problem(
            "rbac",
            f"missing permission: {p}; canaryd's chart grants it in its {CHART_GRANTS[p.grant]}, "
            "otherwise grant it to the identity canaryd runs as",
        )
    if not missing:
        watched = ", ".join(settings.namespaces) if settings.namespaces else "all namespaces"
        lease = (
            f"; Lease {settings.lease_namespace}/{settings.lease_name}" if settings.leader_election else "; no Lease"
        )
        report.ok("rbac", f"all {len(perms)} permissions canaryd uses are granted (watching {watched}{lease})")


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
        why = f"Prometheus at {prom.url}: no answer within {timeout_s:g}s"
        observations = [Observation(s, None, None, error=why) for s in spec.analysis.signals]
    except CanarydError as exc:
        observations = [Observation(s, None, None, error=str(exc)) for s in spec.analysis.signals]
    finally:
        await analyzer.aclose()
    # The judge the engine uses, on one window as if the rollout started now.
    n = len(spec.analysis.signals)
    for obs in observations:
        j = judge_round(obs, spec.analysis, signals=n)[0]
        report.signals.append(SignalResult(j, obs.series))
        if j.verdict == Verdict.ERROR:
            hint = "; check --prometheus-url / CANARYD_PROMETHEUS__URL" if j.reason.startswith("Prometheus at") else ""
            report.problem("analysis", f"signal {j.signal}: {j.reason}{hint}")
        elif obs.series == 0:
            report.problem(
                "analysis",
                f"signal {j.signal}: Prometheus at {prom.url} has no series for stable {target.stable} or canary "
                f"{target.canary} in the last {target.spec.window_s:g}s; {analyzer.no_series_hint(j.signal, target)}",
            )
        else:
            found = "" if obs.series is None else f" ({obs.series} series)"
            report.ok(
                "analysis", f"signal {j.signal} measured{found}; the judge would say {j.verdict.value} now: {j.reason}"
            )
