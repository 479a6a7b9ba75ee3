"""``canaryd check``: everything that would stop a route's rollout, found before it starts.

Owns: the preflight checks (annotations, GAMMA parent and backend pair, backend Services, ready
EndpointSlices of the canary, the RBAC canaryd needs via SelfSubjectAccessReview, one analysis
round against Prometheus) and the ``Report`` they produce. Must not: write anything to the
cluster, or print — ``canaryd.commands.control`` renders the report.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client

from canaryd import spec as ann
from canaryd.analysis import AnalysisTarget, Judgement, Verdict
from canaryd.errors import CanarydError, ForbiddenError, NotFoundError, RouteError, StateError
from canaryd.kube import GATEWAY_GROUP, HTTPROUTES, translate
from canaryd.routes import Pair, RouteClient, RouteRef, gamma_parents, resolve_pair
from canaryd.settings import Settings
from canaryd.state import RolloutState

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


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
        ("discovery.k8s.io", "endpointslices", ("get", "list", "watch"), route_namespace),
        ("", "services", ("get", "list", "watch"), route_namespace),
        ("", "events", ("create",), route_namespace),
        ("coordination.k8s.io", "leases", ("get", "create", "update"), lease_namespace),
    ]
    return [Permission(g, r, v, ns) for g, r, verbs, ns in wanted for v in verbs]


@dataclass(frozen=True)
class Finding:
    ok: bool
    check: str  # annotations | route | service | endpoints | rbac | analysis
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


async def preflight(api: client.ApiClient, ref: RouteRef, *, settings: Settings,
                    prometheus_url: str | None = None, timeout_s: float = 30.0) -> Report:
    """Run every check; raises only when the route is missing or the cluster cannot be reached."""
    report = Report(ref)
    await _check_rbac(api, ref.namespace, settings.lease_namespace, report)
    try:
        obj = await RouteClient(api).get(ref)
    except NotFoundError:
        raise NotFoundError(f"httproute {ref} not found; check the name and namespace "
                            f"(canaryd status -n {ref.namespace} lists the managed routes)") from None
    except ForbiddenError as exc:
        report.problem("route", f"cannot read httproute {ref}: {exc}")
        return report

    annotations: dict[str, str] = obj["metadata"].get("annotations") or {}
    if ann.CANARY not in annotations:
        report.problem("annotations", f"httproute {ref} has no {ann.CANARY} annotation; set it to the backendRef "
                                      "to roll out, e.g. kubectl annotate httproute "
                                      f"{ref.name} -n {ref.namespace} {ann.CANARY}=<backend>")
        return report
    if ann.STATE in annotations:
        try:
            RolloutState.from_annotation(annotations[ann.STATE])
        except StateError as exc:
            report.problem("annotations", f"{ann.STATE}: {exc}")
    try:
        spec = ann.parse_spec(annotations, settings.defaults)
    except CanarydError as exc:
        report.problem("annotations", f"annotation {exc}")
        return report
    assert spec is not None
    if ann.INTENT in annotations:
        try:
            ann.parse_intent(annotations[ann.INTENT])
        except CanarydError as exc:
            report.problem("annotations", str(exc))
    signals = ",".join(spec.analysis.signals) or "none (time-based)"
    report.ok("annotations", f"canary {spec.canary}, steps {','.join(map(str, spec.steps))} every "
                             f"{spec.interval_s:g}s, analysis {signals}")

    parents = gamma_parents(obj)
    pair: Pair | None = None
    if not parents:
        report.problem("route", f"httproute {ref} attaches to a Gateway, not a Service; canaryd manages GAMMA "
                                "routes (parentRefs of kind Service) — annotate the mesh route instead")
    try:
        pair = resolve_pair(obj, spec.canary, spec.stable)
        rules = ", ".join(str(r.rule) for r in pair.rules)
        report.ok("route", f"stable {pair.stable} and canary {pair.canary} share rule(s) {rules}"
                           + (f"; parent Service {parents[0]}" if parents else ""))
    except RouteError as exc:
        report.problem("route", str(exc))

    backends = [pair.stable, pair.canary] if pair else [spec.canary]
    core = client.CoreV1Api(api)
    for backend in backends:
        try:
            await core.read_namespaced_service(backend, ref.namespace)
            report.ok("service", f"Service {ref.namespace}/{backend} exists")
        except Exception as exc:
            err = translate(exc, f"get service {ref.namespace}/{backend}")
            if isinstance(err, NotFoundError):
                report.problem("service", f"backend Service {ref.namespace}/{backend} does not exist; create it "
                                          "or fix the backendRef")
            elif isinstance(err, ForbiddenError):
                report.problem("service", str(err))
            else:
                raise err from exc

    await _check_endpoints(api, ref.namespace, spec.canary, report)

    if spec.analysis.enabled:
        if pair is None:
            report.problem("analysis", "analysis not run: the backend pair could not be resolved (see above)")
        else:
            await _check_analysis(ref, spec, pair, parents[0] if parents else "", settings, prometheus_url,
                                  timeout_s, report)
    return report


async def _check_rbac(api: client.ApiClient, namespace: str, lease_namespace: str, report: Report) -> None:
    authz = client.AuthorizationV1Api(api)
    perms = required_permissions(namespace, lease_namespace)

    async def allowed(p: Permission) -> bool | str:
        body = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(group=p.group, resource=p.resource, verb=p.verb,
                                                            namespace=p.namespace or None)))
        try:
            out = await authz.create_self_subject_access_review(body)
        except Exception as exc:
            err = translate(exc, "create selfsubjectaccessreview")
            if isinstance(err, ForbiddenError):
                return str(err)
            raise err from exc
        return bool(out.status.allowed)

    results = await asyncio.gather(*(allowed(p) for p in perms))
    missing = [p for p, ok in zip(perms, results, strict=True) if ok is False]
    broken = [r for r in results if isinstance(r, str)]
    if broken:
        report.problem("rbac", f"cannot check RBAC: {broken[0]}")
        return
    for p in missing:
        report.problem("rbac", f"missing permission: {p}; grant it to the identity canaryd runs as "
                               "(the chart's ClusterRole/Role has it)")
    if not missing:
        report.ok("rbac", f"all {len(perms)} permissions canaryd needs are granted")


def _slice_ready(es: Any) -> bool:
    for ep in es.endpoints or []:
        ready = ep.conditions.ready if ep.conditions is not None else None
        if ready is not False and ep.addresses:
            return True
    return False


async def _check_endpoints(api: client.ApiClient, namespace: str, canary: str, report: Report) -> None:
    disc = client.DiscoveryV1Api(api)
    try:
        slices = await disc.list_namespaced_endpoint_slice(namespace, label_selector=f"{SERVICE_NAME_LABEL}={canary}")
    except Exception as exc:
        err = translate(exc, f"list endpointslices of {namespace}/{canary}")
        if isinstance(err, ForbiddenError):
            report.problem("endpoints", str(err))
            return
        raise err from exc
    ready = [s for s in slices.items if _slice_ready(s)]
    if ready:
        report.ok("endpoints", f"canary {canary} has ready endpoints ({len(ready)} EndpointSlice(s))")
    elif slices.items:
        report.problem("endpoints", f"canary {canary} has no ready endpoints ({len(slices.items)} EndpointSlice(s), "
                                    "none ready); the rollout would wait and then roll back — check its pods")
    else:
        report.problem("endpoints", f"canary {canary} has no EndpointSlices (label {SERVICE_NAME_LABEL}={canary}); "
                                    "deploy its pods or fix the Service selector")


async def _check_analysis(ref: RouteRef, spec: ann.RolloutSpec, pair: Pair, parent: str, settings: Settings,
                          prometheus_url: str | None, timeout_s: float, report: Report) -> None:
    from canaryd.metrics import PrometheusAnalyzer

    prom = settings.prometheus.model_copy(update={"url": prometheus_url} if prometheus_url else {})
    report.prometheus_url = prom.url
    target = AnalysisTarget(namespace=ref.namespace, route=ref.name, service=parent,
                            port=int(spec.port or pair.port or 80), stable=pair.stable, canary=pair.canary,
                            spec=spec.analysis)
    analyzer = PrometheusAnalyzer(prom)
    try:
        judgements = await asyncio.wait_for(analyzer.analyze(target), timeout_s)
    except TimeoutError:
        judgements = [Judgement(s, Verdict.ERROR, f"no answer from Prometheus at {prom.url} within {timeout_s:g}s")
                      for s in spec.analysis.signals]
    finally:
        await analyzer.aclose()
    report.judgements = list(judgements)
    for j in judgements:
        if j.verdict == Verdict.ERROR:
            report.problem("analysis", f"signal {j.signal}: {j.reason}; check --prometheus-url / "
                                       "CANARYD_PROMETHEUS__URL and that Prometheus is up")
        else:
            report.ok("analysis", f"signal {j.signal} measured; the judge would say {j.verdict.value} now: {j.reason}")


def describe(findings: Sequence[Finding]) -> list[str]:
    return [f"{f.check}: {f.message}" for f in findings]
