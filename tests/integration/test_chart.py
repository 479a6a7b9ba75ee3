"""The Helm chart in charts/canaryd: lint, render every switch, schema rejections, the exact
RBAC, the settings it hands the daemon (loaded with the real ``Settings``), PromQL validity,
and a server-side dry-run plus an RBAC proof against the real apiserver of the devstack.

helm and kubectl come from ``devkit.devstack.binaries.bin_dir()`` (built from Go modules);
promtool from Debian's prometheus package (hack/install-prometheus.sh). Nothing skips.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from canaryd.core.shards import lease_names
from canaryd.core.spec import RolloutDefaults
from canaryd.metrics.custom import TemplateStore, parse_templates
from canaryd.settings import PrometheusSettings, Settings
from devkit.devstack.binaries import bin_dir
from tests.conftest import Stack

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "canaryd"
CRDS = Path(__file__).resolve().parent / "crds"
RELEASE_NS = "canaryd-system"

# What canaryd does with the Kubernetes API, and nothing more (see the chart README and
# docs/rbac.md; tests/integration/test_rbac_proof.py shows each verb is needed).
EXPECTED_RULES = {
    ("gateway.networking.k8s.io", "httproutes", frozenset({"get", "list", "watch", "patch"})),
    ("discovery.k8s.io", "endpointslices", frozenset({"list", "watch"})),
    ("", "services", frozenset({"list", "watch"})),
    ("", "events", frozenset({"create"})),
}
# The metric names the daemon exposes; dashboards and alerts may use nothing else.
METRICS = {
    "canaryd_rollout_phase",
    "canaryd_rollout_canary_weight",
    "canaryd_rollout_step",
    "canaryd_transitions_total",
    "canaryd_rollbacks_total",
    "canaryd_analysis_total",
    "canaryd_reconcile_seconds",
    "canaryd_patch_seconds",
    "canaryd_rollout_last_transition_timestamp_seconds",
    "canaryd_leader",
    "canaryd_weight_overwrites_total",
    "canaryd_analysis_success_ratio",
    "canaryd_analysis_request_rate",
    "canaryd_analysis_requests",
    "canaryd_analysis_latency_seconds",
    "canaryd_analysis_evidence",
    "canaryd_analysis_evidence_threshold",
}
HISTOGRAMS = {"canaryd_reconcile_seconds", "canaryd_patch_seconds"}

# One custom signal, in the format of config/metric-templates.yaml's `templates:` entries.
TEMPLATE = {
    "requests": 'sum(increase(http_requests_total{namespace="{namespace}", service="{backend}"}[{window}]))',
    "errors": 'sum(increase(http_requests_total{namespace="{namespace}", service="{backend}", code=~"5.."}[{window}]))',
}

SWITCHES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced-rbac": {"rbac": {"scope": "namespaced", "namespaces": ["shop", "payments"]}},
    "service-monitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}}},
    "prometheus-rule": {"prometheusRule": {"enabled": True}},
    "pdb": {"podDisruptionBudget": {"enabled": True}},
    "dashboard": {"dashboard": {"enabled": True}},
    "bearer-token": {"prometheus": {"bearerToken": {"secretName": "prom-token"}, "ca": {"configMapName": "prom-ca"}}},
    "basic-auth": {
        "prometheus": {
            "basicAuth": {"username": "canaryd", "passwordSecretName": "prom-basic"},
            "ca": {"secretName": "prom-ca", "key": "ca.pem"},
        }
    },
    "metric-templates": {"metricTemplates": {"templates": {"errors": TEMPLATE}}},
    "existing-templates": {"metricTemplates": {"existingConfigMap": "my-templates"}},
    "single-replica": {"replicaCount": 1, "leaderElection": {"enabled": False}},
    "shards": {"shards": 4, "prometheusRule": {"enabled": True}},
    "all-on": {
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
        "dashboard": {"enabled": True},
        "labelSelector": "canaryd.io/enabled=true",
        "watchNamespaces": ["shop"],
        "image": {"digest": "sha256:" + "a" * 64},
    },
}

# (id, values, a fragment of the error): schema errors, rejected by `helm template` and `helm lint`.
REJECTED: list[tuple[str, dict[str, Any], str]] = [
    ("unknown-top-level-key", {"replicas": 3}, "replicas"),
    ("plain-bearer-token", {"prometheus": {"bearerToken": "s3cr3t"}}, "bearerToken"),
    ("token-beside-secret-ref", {"prometheus": {"bearerToken": {"secretName": "p", "token": "s3cr3t"}}}, "token"),
    ("plain-password", {"prometheus": {"basicAuth": {"username": "u", "password": "s3cr3t"}}}, "password"),
    ("basic-auth-without-secret", {"prometheus": {"basicAuth": {"username": "u"}}}, "passwordSecretName"),
    ("ca-secret-and-configmap", {"prometheus": {"ca": {"secretName": "a", "configMapName": "b"}}}, "ca"),
    ("token-through-extra-config", {"extraConfig": {"prometheus": {"bearer_token": "s3cr3t"}}}, "bearer_token"),
    ("bad-rbac-scope", {"rbac": {"scope": "everywhere"}}, "scope"),
    ("namespaced-without-namespaces", {"rbac": {"scope": "namespaced"}}, "namespaces"),
    ("step-out-of-range", {"defaults": {"steps": [0, 50, 100]}}, "steps"),
    ("template-not-the-file-format", {"metricTemplates": {"templates": {"x": {"query": "sum(x)"}}}}, "query"),
    ("template-without-errors", {"metricTemplates": {"templates": {"x": {"requests": "sum(x)"}}}}, "errors"),
    ("template-blank-query", {"metricTemplates": {"templates": {"x": {**TEMPLATE, "requests": " "}}}}, "requests"),
    ("template-bad-name", {"metricTemplates": {"templates": {"Bad Name": TEMPLATE}}}, "Bad Name"),
    # the whole file pasted as the value: its `templates:` key would be read as a template's name
    ("template-file-nested", {"metricTemplates": {"templates": {"templates": {"x": TEMPLATE}}}}, "templates"),
    ("bad-on-inconclusive", {"defaults": {"onInconclusive": "maybe"}}, "onInconclusive"),
    ("bad-analysis-signal", {"defaults": {"analysis": "datadog"}}, "analysis"),
    ("negative-replicas", {"replicaCount": -1}, "replicaCount"),
    ("string-replicas", {"replicaCount": "two"}, "replicaCount"),
    ("bad-log-level", {"logLevel": "verbose"}, "logLevel"),
    ("root-allowed", {"securityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
    ("writable-root-fs", {"securityContext": {"readOnlyRootFilesystem": False}}, "readOnlyRootFilesystem"),
    ("bad-digest", {"image": {"digest": "latest"}}, "digest"),
    ("bad-scrape-interval", {"serviceMonitor": {"enabled": True, "interval": "often"}}, "interval"),
    ("unknown-nested-key", {"prometheusRule": {"rollback": {"enabld": True}}}, "enabld"),
    ("replicas-without-leader-election", {"leaderElection": {"enabled": False}}, "replicaCount"),
    ("no-shards", {"shards": 0}, "shards"),
    ("too-many-shards", {"shards": 65}, "shards"),
]
# Cross-field checks JSON schema cannot express: the templates `fail`, which `helm template`
# (and install/upgrade) turn into errors; `helm lint` only reports them as [INFO].
REJECTED_BY_TEMPLATE: list[tuple[str, dict[str, Any], str]] = [
    ("steps-not-increasing", {"defaults": {"steps": [50, 10, 100]}}, "defaults.steps must increase strictly"),
    ("renew-not-below-duration", {"leaderElection": {"leaseDurationSeconds": 5, "renewSeconds": 5}}, "renewSeconds"),
    (
        "shards-without-leader-election",
        {"shards": 2, "replicaCount": 1, "leaderElection": {"enabled": False}},
        "shards > 1 needs leaderElection.enabled=true",
    ),
    (
        "watch-outside-rbac-namespaces",
        {"rbac": {"scope": "namespaced", "namespaces": ["a"]}, "watchNamespaces": ["b"]},
        "not in rbac.namespaces",
    ),
]


# --- helpers --------------------------------------------------------------------------------


def tool(name: str) -> str:
    path = bin_dir() / name
    assert path.is_file(), f"{path} missing; run hack/build-binaries.sh"
    return str(path)


def run(
    argv: list[str], *, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    # A clean HOME-less helm: no repositories, no plugins, no cluster (template/lint never connect).
    base = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "HELM_CACHE_HOME": "/tmp/canaryd-helm/cache",
        "HELM_CONFIG_HOME": "/tmp/canaryd-helm/config",
        "HELM_DATA_HOME": "/tmp/canaryd-helm/data",
        "KUBECONFIG": "/dev/null",
    }
    return subprocess.run(
        argv, input=input, capture_output=True, text=True, timeout=timeout, env={**base, **(env or {})}, check=False
    )


def helm(*args: str, values: dict[str, Any] | None = None, tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [tool("helm"), *args]
    if values:
        assert tmp is not None
        vf = tmp / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
        vf.write_text(yaml.safe_dump(values))
        argv += ["-f", str(vf)]
    return run(argv)


def render(
    tmp: Path, values: dict[str, Any] | None = None, *, namespace: str = RELEASE_NS, release: str = "canaryd"
) -> list[dict[str, Any]]:
    proc = helm("template", release, str(CHART), "--namespace", namespace, values=values, tmp=tmp)
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def render_text(
    tmp: Path, values: dict[str, Any] | None = None, *, namespace: str = RELEASE_NS, release: str = "canaryd"
) -> str:
    proc = helm("template", release, str(CHART), "--namespace", namespace, values=values, tmp=tmp)
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return proc.stdout


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [c] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(docs)["env"]}


def normalized_rules(role: dict[str, Any]) -> set[tuple[str, str, frozenset[str]]]:
    out = set()
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.add((group, resource, frozenset(rule["verbs"])))
    return out


def assert_no_wildcards(obj: Any, where: str) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert_no_wildcards(k, where)
            assert_no_wildcards(v, where)
    elif isinstance(obj, list):
        for v in obj:
            assert_no_wildcards(v, where)
    elif isinstance(obj, str):
        assert "*" not in obj, f"wildcard in {where}: {obj!r}"


def load_settings_from_render(
    docs: list[dict[str, Any]], tmp: Path, pod: str = "canaryd-abc-123", monkeypatch: pytest.MonkeyPatch | None = None
) -> Settings:
    """Settings() exactly as the pod would see them: the ConfigMap file plus the container env."""
    assert monkeypatch is not None
    c = container(docs)
    deploy = one(docs, "Deployment")
    cm_name = next(
        v["configMap"]["name"] for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"
    )
    data = one(docs, "ConfigMap", cm_name)["data"]
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "config")
    for name in list(os.environ):
        if name.startswith("CANARYD_"):
            monkeypatch.delenv(name)
    for e in c["env"]:
        if "value" in e:
            value = e["value"]
        else:
            field = e["valueFrom"]["fieldRef"]["fieldPath"]
            value = {"metadata.name": pod, "metadata.namespace": deploy["metadata"]["namespace"]}[field]
        monkeypatch.setenv(e["name"], value)
    config_file = os.environ["CANARYD_CONFIG_FILE"]
    assert config_file.startswith(mount + "/")
    local = tmp / "mounted" / Path(config_file).name
    local.parent.mkdir(exist_ok=True)
    local.write_text(data[Path(config_file).name])
    monkeypatch.setenv("CANARYD_CONFIG_FILE", str(local))
    return Settings()


# --- lint and render ----------------------------------------------------------------------


def test_helm_lint_clean() -> None:
    for args in ((), ("--strict",)):
        proc = helm("lint", str(CHART), *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "[ERROR]" not in proc.stdout and "[WARNING]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("case", sorted(SWITCHES))
def test_lint_strict_with_switch(case: str, tmp_path: Path) -> None:
    proc = helm("lint", "--strict", str(CHART), values=SWITCHES[case], tmp=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("case", sorted(SWITCHES))
def test_template_renders(case: str, tmp_path: Path) -> None:
    docs = render(tmp_path, SWITCHES[case])
    assert "Deployment" in kinds(docs)
    assert "Secret" not in kinds(docs), "the chart must never create Secrets (credentials come from refs)"
    for d in docs:
        assert d["metadata"]["name"].startswith("canaryd")
        if d["kind"] not in {"ClusterRole", "ClusterRoleBinding"}:
            assert d["metadata"].get("namespace"), f"{d['kind']} {d['metadata']['name']} has no namespace"


def test_default_render(tmp_path: Path) -> None:
    docs = render(tmp_path)
    assert kinds(docs) == sorted(
        [
            "ServiceAccount",
            "ConfigMap",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment",
        ]
    )
    deploy = one(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    assert container(docs)["image"] == "ghcr.io/canaryd/canaryd:0.1.0"
    env = env_of(docs)
    assert env["CANARYD_LEADER_ELECTION"] == "true"
    assert env["CANARYD_LEASE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["CANARYD_IDENTITY"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "CANARYD_NAMESPACES" not in env
    c = container(docs)
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    svc = one(docs, "Service")
    assert svc["spec"]["ports"][0]["port"] == 8080
    assert svc["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]


def test_restricted_security_context(tmp_path: Path) -> None:
    docs = render(tmp_path)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    psc, sc = pod["securityContext"], container(docs)["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 65532
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is True  # it talks to the API
    assert not any(v.get("hostPath") for v in pod["volumes"])


# --- RBAC -----------------------------------------------------------------------------------


def test_cluster_role_is_exactly_the_documented_rules(tmp_path: Path) -> None:
    text = render_text(tmp_path)
    docs = [d for d in yaml.safe_load_all(text) if d]
    role = one(docs, "ClusterRole")
    assert_no_wildcards(role, "ClusterRole")
    assert normalized_rules(role) == EXPECTED_RULES
    assert len(role["rules"]) == len(EXPECTED_RULES)
    assert all("resourceNames" not in r for r in role["rules"])
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    sa = one(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": RELEASE_NS}]
    for d in docs:
        if d["kind"] in {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}:
            assert_no_wildcards(d, f"{d['kind']} {d['metadata']['name']}")
    assert "aggregationRule" not in role


def test_lease_role_in_release_namespace_only(tmp_path: Path) -> None:
    docs = render(tmp_path)
    role = one(docs, "Role")
    assert role["metadata"]["namespace"] == RELEASE_NS
    verbs: dict[str, set[str]] = {}
    for rule in role["rules"]:
        assert rule["apiGroups"] == ["coordination.k8s.io"] and rule["resources"] == ["leases"]
        for verb in rule["verbs"]:
            verbs[verb] = set(rule.get("resourceNames", []))
    assert set(verbs) == {"get", "create", "update"}
    assert verbs["get"] == verbs["update"] == {"canaryd-leader"}
    binding = one(docs, "RoleBinding")
    assert binding["metadata"]["namespace"] == RELEASE_NS
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert env_of(docs)["CANARYD_LEASE_NAME"] == "canaryd-leader"


def test_shards_replicas_leases_and_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(tmp_path, SWITCHES["shards"])
    assert one(docs, "Deployment")["spec"]["replicas"] == 4  # at least one replica per shard
    names = {n for rule in one(docs, "Role")["rules"] for n in rule.get("resourceNames", [])}
    assert names == set(lease_names("canaryd-leader", 4)) == {f"canaryd-leader-shard-{i}" for i in range(4)}
    s = load_settings_from_render(docs, tmp_path, monkeypatch=monkeypatch)
    assert s.shards == 4 and s.lease_name == "canaryd-leader"
    [alert] = [
        r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"] if r["alert"] == "CanarydNoLeader"
    ]
    assert "< 4" in alert["expr"]  # every shard needs a holder
    assert one(render(tmp_path, {"shards": 2, "replicaCount": 5}), "Deployment")["spec"]["replicas"] == 5


def test_no_lease_role_without_leader_election(tmp_path: Path) -> None:
    docs = render(tmp_path, SWITCHES["single-replica"])
    assert "Role" not in kinds(docs) and "RoleBinding" not in kinds(docs)
    assert env_of(docs)["CANARYD_LEADER_ELECTION"] == "false"


def test_namespaced_rbac(tmp_path: Path) -> None:
    docs = render(tmp_path, SWITCHES["namespaced-rbac"])
    assert "ClusterRole" not in kinds(docs) and "ClusterRoleBinding" not in kinds(docs)
    roles = {
        d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] != RELEASE_NS
    }
    assert set(roles) == {"shop", "payments"}
    for role in roles.values():
        assert_no_wildcards(role, "Role")
        assert normalized_rules(role) == EXPECTED_RULES
    bindings = {d["metadata"]["namespace"] for d in docs if d["kind"] == "RoleBinding"}
    assert bindings == {"shop", "payments", RELEASE_NS}
    assert json.loads(env_of(docs)["CANARYD_NAMESPACES"]) == ["shop", "payments"]


def test_namespaced_rbac_watch_subset(tmp_path: Path) -> None:
    docs = render(tmp_path, {"rbac": {"scope": "namespaced", "namespaces": ["a", "b"]}, "watchNamespaces": ["b"]})
    assert json.loads(env_of(docs)["CANARYD_NAMESPACES"]) == ["b"]


# --- schema ---------------------------------------------------------------------------------


def test_values_yaml_satisfies_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema, cls=jsonschema.Draft7Validator)
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(("case", "values", "fragment"), REJECTED, ids=[r[0] for r in REJECTED])
def test_bad_values_rejected(case: str, values: dict[str, Any], fragment: str, tmp_path: Path) -> None:
    for command in (("template", "canaryd", str(CHART), "--namespace", RELEASE_NS), ("lint", "--strict", str(CHART))):
        proc = helm(*command, values=values, tmp=tmp_path)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"helm {command[0]} accepted {case}: {values}\n{out}"
        assert fragment in out, f"helm {command[0]} rejected {case} without naming {fragment!r}:\n{out}"


@pytest.mark.parametrize(("case", "values", "fragment"), REJECTED_BY_TEMPLATE, ids=[r[0] for r in REJECTED_BY_TEMPLATE])
def test_bad_combinations_fail_template(case: str, values: dict[str, Any], fragment: str, tmp_path: Path) -> None:
    proc = helm("template", "canaryd", str(CHART), "--namespace", RELEASE_NS, values=values, tmp=tmp_path)
    assert proc.returncode != 0, f"helm template accepted {case}: {values}\n{proc.stdout}"
    assert fragment in proc.stderr, proc.stderr
    lint = helm("lint", str(CHART), values=values, tmp=tmp_path)
    assert fragment in lint.stdout + lint.stderr, "helm lint should at least report it"


# --- what the daemon gets -------------------------------------------------------------------


def test_default_render_gives_default_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(tmp_path)
    s = load_settings_from_render(docs, tmp_path, monkeypatch=monkeypatch)
    assert s.defaults == RolloutDefaults()
    assert s.prometheus == PrometheusSettings()
    assert s.identity == "canaryd-abc-123"
    assert s.lease_namespace == RELEASE_NS
    assert s.lease_name == "canaryd-leader"
    assert s.leader_election is True
    assert s.shards == 1
    assert s.namespaces == []
    assert s.label_selector is None
    assert s.log_format == "json" and s.log_level == "info"
    assert s.http_port == 8080
    expected = Settings.model_construct()  # the model's defaults, without sources
    for name in (
        "max_concurrent_rollouts",
        "lease_duration_s",
        "lease_renew_s",
        "field_manager",
        "kubeconfig",
        "context",
        "http_host",
    ):
        assert getattr(s, name) == Settings.model_fields[name].default, name
    assert expected is not None


def test_values_reach_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "rbac": {"scope": "namespaced", "namespaces": ["shop", "payments"]},
        "labelSelector": "canaryd.io/enabled=true",
        "logLevel": "debug",
        "logFormat": "console",
        "maxConcurrentRollouts": 1000000,
        "leaderElection": {"leaseName": "cd-lease", "leaseDurationSeconds": 30, "renewSeconds": 10},
        "defaults": {
            "steps": [1, 2, 100],
            "intervalSeconds": 90,
            "readyDeadlineSeconds": 1000000,
            "analysis": "envoy,custom:errors",
            "latencyMaxMs": 250,
            "minRequests": 100000000,
            "onInconclusive": "rollback",
            "confidence": 0.95,
            "tolerancePct": 1,
            "maxErrors": 7,
            "failureThreshold": 4,
            "maxInconclusive": 9,
            "successRateMin": 99.5,
            "latencyQuantile": 0.95,
        },
        "prometheus": {
            "url": "https://prom.monitoring:9091",
            "timeoutSeconds": 2.5,
            "maxConcurrency": 8,
            "headers": {"X-Scope-OrgID": "tenant-a"},
            "bearerToken": {"secretName": "prom-token", "key": "tok"},
            "ca": {"secretName": "prom-ca", "key": "ca.pem"},
            "envoyClusterPattern": r"^outbound\|{port}\|\|{service}\.{namespace}\.svc",
            "envoyClusterLabel": "cluster_name",
        },
        "metricTemplates": {"templates": {"errors": TEMPLATE}},
        "service": {"port": 9090},
        "extraConfig": {"field_manager": "canaryd-prod"},
    }
    docs = render(tmp_path, values)
    s = load_settings_from_render(docs, tmp_path, monkeypatch=monkeypatch)
    assert s.namespaces == ["shop", "payments"]
    assert s.label_selector == "canaryd.io/enabled=true"
    assert (s.log_level, s.log_format) == ("debug", "console")
    assert s.max_concurrent_rollouts == 1000000
    assert (s.lease_name, s.lease_duration_s, s.lease_renew_s) == ("cd-lease", 30.0, 10.0)
    assert s.http_port == 9090
    assert s.field_manager == "canaryd-prod"
    d = s.defaults
    assert d.steps == [1, 2, 100] and d.interval_s == 90.0 and d.ready_deadline_s == 1000000.0
    assert d.analysis == "envoy,custom:errors" and d.latency_max_ms == 250.0
    assert d.min_requests == 100000000 and d.on_inconclusive == "rollback"
    assert (d.confidence, d.tolerance_pct, d.max_errors) == (0.95, 1.0, 7)
    assert (d.failure_threshold, d.max_inconclusive, d.success_rate_min, d.latency_quantile) == (4, 9, 99.5, 0.95)
    p = s.prometheus
    assert p.url == "https://prom.monitoring:9091" and p.timeout_s == 2.5 and p.max_concurrency == 8
    assert p.headers == {"X-Scope-OrgID": "tenant-a"}
    assert p.envoy_cluster_pattern == r"^outbound\|{port}\|\|{service}\.{namespace}\.svc"
    assert p.envoy_cluster_label == "cluster_name"
    assert p.bearer_token is None
    c = container(docs)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert p.bearer_token_file == mounts["prometheus-token"] + "/tok"
    assert p.ca_file == mounts["prometheus-ca"] + "/ca.pem"
    assert p.custom_templates_file == mounts["metric-templates"] + "/metric-templates.yaml"
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["prometheus-token"]["secret"]["secretName"] == "prom-token"
    assert volumes["prometheus-ca"]["secret"]["secretName"] == "prom-ca"
    cm = one(docs, "ConfigMap", volumes["metric-templates"]["configMap"]["name"])
    assert yaml.safe_load(cm["data"]["metric-templates.yaml"]) == {"templates": values["metricTemplates"]["templates"]}
    assert c["ports"][0]["containerPort"] == 9090


def test_metric_templates_render_the_file_the_daemon_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The shipped example file's templates as the value: the chart must hand the daemon that very file.
    example = yaml.safe_load((REPO / "config" / "metric-templates.yaml").read_text())
    docs = render(tmp_path, {"metricTemplates": {"templates": example["templates"]}})
    s = load_settings_from_render(docs, tmp_path, monkeypatch=monkeypatch)
    assert s.prometheus.custom_templates_file is not None
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    cm = one(docs, "ConfigMap", volumes["metric-templates"]["configMap"]["name"])
    name = Path(s.prometheus.custom_templates_file).name
    assert [i["path"] for i in volumes["metric-templates"]["configMap"]["items"]] == [name]
    mounted = tmp_path / "metric-templates" / name
    mounted.parent.mkdir()
    mounted.write_text(cm["data"][name])
    assert yaml.safe_load(mounted.read_text()) == example
    store = TemplateStore(str(mounted))  # the daemon's own loader, as the analyzer uses it
    expected = parse_templates(example, source="config/metric-templates.yaml")
    assert sorted(expected) == ["app-http", "envoy-xx", "hubble"]
    for template in expected.values():
        assert store.get(template.name) == template


def test_basic_auth_and_configmap_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(
        tmp_path,
        SWITCHES["basic-auth"] | {"metricTemplates": {"existingConfigMap": "mine", "existingConfigMapKey": "t.yaml"}},
    )
    s = load_settings_from_render(docs, tmp_path, monkeypatch=monkeypatch)
    assert s.prometheus.basic_auth_user == "canaryd"
    assert s.prometheus.basic_auth_password_file == "/var/run/secrets/canaryd/prometheus-basic-auth/password"
    assert s.prometheus.ca_file == "/etc/canaryd/prometheus-ca/ca.pem"
    assert s.prometheus.custom_templates_file == "/etc/canaryd/metric-templates/t.yaml"
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["prometheus-basic-auth"]["secret"]["secretName"] == "prom-basic"
    assert volumes["metric-templates"]["configMap"]["name"] == "mine"
    assert [d for d in docs if d["kind"] == "ConfigMap" and "metric-templates" in d["metadata"]["name"]] == []
    docs = render(tmp_path, {"prometheus": {"ca": {"configMapName": "prom-ca"}}})
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["prometheus-ca"]["configMap"]["name"] == "prom-ca"


def test_extra_volumes_are_pod_volumes(tmp_path: Path) -> None:
    # With scheduling values set, extra volumes must still land under volumes (not in tolerations).
    values = {
        "extraVolumes": [{"name": "hook-token", "secret": {"secretName": "hook-token"}}],
        "extraVolumeMounts": [{"name": "hook-token", "mountPath": "/var/run/secrets/hook", "readOnly": True}],
        "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}],
    }
    pod = one(render(tmp_path, values), "Deployment")["spec"]["template"]["spec"]
    assert {"name": "hook-token", "secret": {"secretName": "hook-token"}} in pod["volumes"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["topologySpreadConstraints"] == values["topologySpreadConstraints"]


def test_config_change_rolls_pods(tmp_path: Path) -> None:
    a = one(render(tmp_path), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    b = one(render(tmp_path, {"defaults": {"intervalSeconds": 30}}), "Deployment")["spec"]["template"]["metadata"]
    assert a["checksum/config"] != b["annotations"]["checksum/config"]


# --- optional kinds -------------------------------------------------------------------------


def test_service_monitor(tmp_path: Path) -> None:
    docs = render(tmp_path, SWITCHES["service-monitor"])
    sm, svc = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    [ep] = sm["spec"]["endpoints"]
    assert ep["port"] == svc["spec"]["ports"][0]["name"] and ep["path"] == "/metrics"
    assert ep["honorLabels"] is True  # keep the route's namespace label


def _rule_exprs(docs: list[dict[str, Any]]) -> dict[str, str]:
    rule = one(docs, "PrometheusRule")
    return {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}


def test_prometheus_rule_alerts(tmp_path: Path) -> None:
    exprs = _rule_exprs(render(tmp_path, SWITCHES["prometheus-rule"]))
    assert set(exprs) == {"CanarydRollback", "CanarydRolloutStuck", "CanarydAnalysisErrors", "CanarydNoLeader"}
    assert "canaryd_rollbacks_total" in exprs["CanarydRollback"]
    assert "canaryd_rollout_last_transition_timestamp_seconds" in exprs["CanarydRolloutStuck"]
    assert 'verdict="error"' in exprs["CanarydAnalysisErrors"]
    off = _rule_exprs(render(tmp_path, {"prometheusRule": {"enabled": True, "stuck": {"enabled": False}}}))
    assert "CanarydRolloutStuck" not in off


def test_prometheus_rule_is_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing; run hack/install-prometheus.sh (Debian's prometheus package)"
    rule = one(
        render(
            tmp_path,
            SWITCHES["prometheus-rule"]
            | {"prometheusRule": {"enabled": True, "additionalRules": [{"alert": "Extra", "expr": "vector(1) > 2"}]}},
        ),
        "PrometheusRule",
    )
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    proc = run([promtool, "check", "rules", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 5 rules found" in proc.stdout, proc.stdout


def _metric_names(exprs: list[str]) -> set[str]:
    names = set()
    for expr in exprs:
        for m in re.findall(r"\bcanaryd_[a-z_]+", expr):
            names.add(
                re.sub(r"_(bucket|sum|count)$", "", m) if re.sub(r"_(bucket|sum|count)$", "", m) in HISTOGRAMS else m
            )
    return names


def test_alerts_and_dashboard_use_only_exposed_metrics(tmp_path: Path) -> None:
    exprs = list(_rule_exprs(render(tmp_path, SWITCHES["prometheus-rule"])).values())
    assert _metric_names(exprs) <= METRICS
    dash = json.loads((CHART / "dashboards" / "canaryd.json").read_text())
    dexprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    dexprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    dexprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    used = _metric_names(dexprs)
    assert used <= METRICS, used - METRICS
    for needed in (
        "canaryd_rollout_phase",
        "canaryd_rollout_canary_weight",
        "canaryd_analysis_total",
        "canaryd_rollbacks_total",
    ):
        assert needed in used, f"dashboard lacks {needed}"
    assert dash["uid"] and dash["title"] == "canaryd"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_configmap(tmp_path: Path) -> None:
    cm = one(
        render(tmp_path, {"dashboard": {"enabled": True, "namespace": "grafana"}}), "ConfigMap", "canaryd-dashboard"
    )
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "grafana"
    assert json.loads(cm["data"]["canaryd.json"]) == json.loads((CHART / "dashboards" / "canaryd.json").read_text())


def test_pdb(tmp_path: Path) -> None:
    docs = render(tmp_path, SWITCHES["pdb"])
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    pdb = one(render(tmp_path, SWITCHES["all-on"]), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


def render_notes(tmp_path: Path, values: dict[str, Any]) -> str:
    """NOTES.txt as helm prints it after install: helm template does not print it (and install --dry-run
    needs a cluster), so it is rendered through tpl from a copy of the chart."""
    copy = tmp_path / "chart"
    if not copy.exists():
        shutil.copytree(CHART, copy)
        (copy / "templates" / "NOTES.txt").rename(copy / "NOTES.src")
        (copy / "templates" / "notes.yaml").write_text('notes: {{ tpl (.Files.Get "NOTES.src") . | toJson }}\n')
    vf = tmp_path / "v.yaml"
    vf.write_text(yaml.safe_dump(values))
    argv = [tool("helm"), "template", "canaryd", str(copy), "-n", RELEASE_NS, "-f", str(vf)]
    proc = run([*argv, "--show-only", "templates/notes.yaml"])
    assert proc.returncode == 0, proc.stderr
    notes: str = yaml.safe_load(proc.stdout)["notes"]
    return notes


def test_notes_show_how_to_start(tmp_path: Path) -> None:
    notes = render_notes(tmp_path, {"rbac": {"scope": "namespaced", "namespaces": ["shop", "payments"]}})
    assert (
        "kubectl annotate httproute whoami canaryd.io/canary=whoami-v2 canaryd.io/steps=10,50,100 "
        "canaryd.io/interval=1m"
    ) in notes
    assert "canaryd status -A" in notes and "kubectl canaryd status -A" in notes
    assert "Watching HTTPRoutes in: shop, payments" in notes
    assert f"{RELEASE_NS}/canaryd-leader" in notes
    # The default analysis is none: said plainly, with how to turn it on.
    assert "Default analysis: none. Rollouts are NOT analysed" in notes
    assert "Add canaryd.io/analysis=envoy" in notes
    assert "kubectl label" not in notes and "label selector" not in notes


def test_notes_follow_analysis_and_label_selector(tmp_path: Path) -> None:
    notes = render_notes(
        tmp_path,
        {"labelSelector": "canaryd.io/enabled=true", "defaults": {"analysis": "envoy,dapr", "successRateMin": 99.5}},
    )
    assert "Default analysis: envoy,dapr, judged with Prometheus at http://prometheus-server.monitoring:9090" in notes
    assert "canary success rate >= 99.5%" in notes and "NOT analysed" not in notes
    assert "Watching HTTPRoutes in: all namespaces (label selector canaryd.io/enabled=true)." in notes
    assert "kubectl label httproute whoami canaryd.io/enabled=true" in notes
    # A selector that is not one label=value cannot be turned into a command: it is quoted as it is.
    notes = render_notes(tmp_path, {"labelSelector": "tier in (web,api)"})
    assert "canaryd only considers routes matching the label selector tier in (web,api)" in notes
    assert "kubectl label httproute" not in notes


def test_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def leaves(obj: Any, prefix: str = "") -> Iterator[str]:
        if (
            isinstance(obj, dict)
            and obj
            and prefix not in {"resources.", "podSecurityContext.", "securityContext.", "dashboard.labels."}
        ):
            for k, v in obj.items():
                yield from leaves(v, f"{prefix}{k}.")
        else:
            yield prefix.rstrip(".")

    missing = [k for k in leaves(values) if f"`{k}`" not in readme]
    assert not missing, f"chart README lacks {missing}"


# --- network policy (no Cilium CRDs here: parsing and checking the structure is the test) ----

CILIUM_POLICY = REPO / "config" / "cilium-network-policy.yaml"


def _ports(rule: dict[str, Any]) -> set[tuple[str, str]]:
    return {(p["port"], p["protocol"]) for tp in rule.get("toPorts", []) for p in tp["ports"]}


def _any_namespace(selector: dict[str, Any]) -> bool:
    return {"key": "k8s:io.kubernetes.pod.namespace", "operator": "Exists"} in selector.get("matchExpressions", [])


def test_cilium_network_policy(tmp_path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(CILIUM_POLICY.read_text()) if d]
    assert len(docs) == 1
    [pol] = docs
    assert pol["apiVersion"] == "cilium.io/v2" and pol["kind"] == "CiliumNetworkPolicy"
    spec = pol["spec"]
    assert set(spec) >= {"endpointSelector", "egress", "ingress"}
    # It selects the chart's pods (for any release name) and nothing else of the chart.
    rendered = render(tmp_path)
    pod_labels = one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = spec["endpointSelector"]
    assert set(selector) == {"matchLabels"}
    assert selector["matchLabels"].items() <= pod_labels.items()
    assert selector["matchLabels"] == {"app.kubernetes.io/name": "canaryd"}

    egress = spec["egress"]
    assert len(egress) == 3, "only the API server, Prometheus and DNS"
    for rule in egress:
        assert not {"toCIDR", "toCIDRSet", "toFQDNs", "toServices"} & set(rule), rule
        assert "world" not in rule.get("toEntities", []) and "all" not in rule.get("toEntities", [])
    # 1. the API server
    [api] = [r for r in egress if "toEntities" in r]
    assert api["toEntities"] == ["kube-apiserver"]
    # 2. Prometheus, 9090/TCP, any namespace
    [prom] = [
        r
        for r in egress
        if any(e.get("matchLabels", {}).get("app.kubernetes.io/name") == "prometheus" for e in r.get("toEndpoints", []))
    ]
    [sel] = prom["toEndpoints"]
    assert sel["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert _any_namespace(sel)
    assert _ports(prom) == {("9090", "TCP")}
    assert str(PrometheusSettings().url).rstrip("/").endswith(":9090")  # the default URL's port
    # 3. DNS to kube-dns on 53 UDP+TCP, through the DNS proxy
    [dns] = [
        r
        for r in egress
        if any(e.get("matchLabels", {}).get("k8s:k8s-app") == "kube-dns" for e in r.get("toEndpoints", []))
    ]
    [sel] = dns["toEndpoints"]
    assert sel["matchLabels"] == {"k8s:io.kubernetes.pod.namespace": "kube-system", "k8s:k8s-app": "kube-dns"}
    assert _ports(dns) == {("53", "UDP"), ("53", "TCP")}
    [tp] = dns["toPorts"]
    assert tp["rules"]["dns"], "DNS rules (the DNS proxy) are required"

    # Ingress: Prometheus (any namespace) on the metrics port only.
    [ing] = spec["ingress"]
    [src] = ing["fromEndpoints"]
    assert src["matchLabels"] == {"app.kubernetes.io/name": "prometheus"} and _any_namespace(src)
    port = container(rendered)["ports"][0]["containerPort"]
    assert _ports(ing) == {(str(port), "TCP")}
    assert not {"fromEntities", "fromCIDR", "fromCIDRSet"} & set(ing)


# --- against the real apiserver -----------------------------------------------------------


def kubectl(
    stack: Stack, *args: str, input: str | None = None, kubeconfig: Path | None = None
) -> subprocess.CompletedProcess[str]:
    path = stack.bin_dir / "kubectl"
    assert path.is_file(), f"{path} missing; run hack/build-binaries.sh"
    return run([str(path), "--kubeconfig", str(kubeconfig or stack.kubeconfig), *args], input=input)


def _install_monitoring_crds(stack: Stack) -> None:
    proc = kubectl(stack, "apply", "--server-side", "-f", str(CRDS))
    assert proc.returncode == 0, proc.stderr
    proc = kubectl(
        stack,
        "wait",
        "--for",
        "condition=Established",
        "--timeout",
        "60s",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
    )
    assert proc.returncode == 0, proc.stderr


def _pod_from(docs: list[dict[str, Any]], namespace: str) -> dict[str, Any]:
    template = one(docs, "Deployment")["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "canaryd-psa-probe", "namespace": namespace, "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    }


async def test_chart_server_dry_run(stack: Stack, namespace: str, tmp_path: Path) -> None:
    await asyncio.to_thread(_install_monitoring_crds, stack)
    proc = kubectl(
        stack,
        "label",
        "namespace",
        namespace,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/warn=restricted",
        "--overwrite",
    )
    assert proc.returncode == 0, proc.stderr
    for case in ("all-on", "namespaced-rbac", "bearer-token", "basic-auth", "metric-templates", "single-replica"):
        values = dict(SWITCHES[case])
        if case == "namespaced-rbac":
            values = {"rbac": {"scope": "namespaced", "namespaces": [namespace]}}
        if case == "all-on":
            values = values | {"watchNamespaces": [namespace]}
        text = render_text(tmp_path, values, namespace=namespace, release=f"canaryd-{case}")
        proc = await asyncio.to_thread(kubectl, stack, "apply", "--dry-run=server", "-f", "-", input=text)
        assert proc.returncode == 0, f"{case}: {proc.stderr}"
        assert "would violate PodSecurity" not in proc.stderr, f"{case}: {proc.stderr}"
        # Enforce (not only warn) the restricted Pod Security Standard on the pod itself.
        pod = _pod_from([d for d in yaml.safe_load_all(text) if d], namespace)
        proc = await asyncio.to_thread(kubectl, stack, "apply", "--dry-run=server", "-f", "-", input=json.dumps(pod))
        assert proc.returncode == 0, f"{case}: pod fails the restricted PSS: {proc.stderr}"
    # Negative control: the same pod without its hardening is refused, so the check has teeth.
    for c in pod["spec"]["containers"]:
        c["securityContext"] = {"runAsNonRoot": True}
    proc = await asyncio.to_thread(kubectl, stack, "apply", "--dry-run=server", "-f", "-", input=json.dumps(pod))
    assert proc.returncode != 0 and "violates PodSecurity" in proc.stderr, proc.stderr


def _can(stack: Stack, kubeconfig: Path, verb: str, resource: str, *ns: str) -> bool:
    proc = kubectl(stack, "auth", "can-i", verb, resource, *ns, kubeconfig=kubeconfig)
    assert proc.stdout.strip() in {"yes", "no"}, proc.stdout + proc.stderr
    return proc.stdout.strip() == "yes"


GRANTED = [
    ("get", "httproutes.gateway.networking.k8s.io"),
    ("list", "httproutes.gateway.networking.k8s.io"),
    ("watch", "httproutes.gateway.networking.k8s.io"),
    ("patch", "httproutes.gateway.networking.k8s.io"),
    ("list", "endpointslices.discovery.k8s.io"),
    ("watch", "endpointslices.discovery.k8s.io"),
    ("list", "services"),
    ("watch", "services"),
    ("create", "events"),
]
DENIED = [
    ("update", "httproutes.gateway.networking.k8s.io"),
    ("delete", "httproutes.gateway.networking.k8s.io"),
    ("create", "httproutes.gateway.networking.k8s.io"),
    ("patch", "services"),
    ("get", "secrets"),
    ("list", "configmaps"),
    ("get", "pods"),
    ("delete", "events"),
    ("list", "events"),
    ("patch", "endpointslices.discovery.k8s.io"),
    # Granted by earlier versions of the chart; the daemon never makes these calls.
    ("get", "services"),
    ("get", "endpointslices.discovery.k8s.io"),
    ("patch", "events"),
    ("create", "events.events.k8s.io"),
    ("patch", "events.events.k8s.io"),
    ("list", "leases.coordination.k8s.io"),
    ("delete", "leases.coordination.k8s.io"),
]


async def test_rbac_proof(stack: Stack, namespace: str, tmp_path: Path) -> None:
    """Apply the chart's RBAC for real and ask the apiserver what the ServiceAccount may do."""
    release = f"cd-{namespace}"
    docs = render(tmp_path, namespace=namespace, release=release)
    rbac = [
        d for d in docs if d["kind"] in {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    ]
    text = "\n---\n".join(yaml.safe_dump(d) for d in rbac)
    try:
        proc = await asyncio.to_thread(kubectl, stack, "apply", "-f", "-", input=text)
        assert proc.returncode == 0, proc.stderr
        sa = one(docs, "ServiceAccount")["metadata"]["name"]
        kc = await asyncio.to_thread(stack.sa_kubeconfig, namespace, sa)
        other = "kube-system"
        for verb, resource in GRANTED:
            assert _can(stack, kc, verb, resource, "-n", namespace), f"{verb} {resource} denied"
            assert _can(stack, kc, verb, resource, "-n", other), f"{verb} {resource} denied (cluster scope)"
        for verb, resource in DENIED:
            assert not _can(stack, kc, verb, resource, "-n", namespace), f"{verb} {resource} granted"
        assert not _can(
            stack, kc, "patch", "httproutes.gateway.networking.k8s.io", "--subresource=status", "-n", namespace
        )
        lease = "leases.coordination.k8s.io"
        assert _can(stack, kc, "create", lease, "-n", namespace)
        assert _can(stack, kc, "get", f"{lease}/canaryd-leader", "-n", namespace)
        assert _can(stack, kc, "update", f"{lease}/canaryd-leader", "-n", namespace)
        assert not _can(stack, kc, "update", f"{lease}/someone-else", "-n", namespace)
        assert not _can(stack, kc, "create", lease, "-n", other)
        assert not _can(stack, kc, "get", f"{lease}/canaryd-leader", "-n", other)
    finally:
        for kind in ("clusterrolebinding", "clusterrole"):
            await asyncio.to_thread(kubectl, stack, "delete", kind, release, "--ignore-not-found")


async def test_rbac_proof_namespaced(stack: Stack, namespace: str, tmp_path: Path) -> None:
    release = f"cd-{namespace}"
    docs = render(
        tmp_path, {"rbac": {"scope": "namespaced", "namespaces": [namespace]}}, namespace=namespace, release=release
    )
    assert not [d for d in docs if d["kind"].startswith("Cluster")]
    rbac = [d for d in docs if d["kind"] in {"ServiceAccount", "Role", "RoleBinding"}]
    proc = await asyncio.to_thread(
        kubectl, stack, "apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in rbac)
    )
    assert proc.returncode == 0, proc.stderr
    sa = one(docs, "ServiceAccount")["metadata"]["name"]
    kc = await asyncio.to_thread(stack.sa_kubeconfig, namespace, sa)
    for verb, resource in GRANTED:
        assert _can(stack, kc, verb, resource, "-n", namespace), f"{verb} {resource} denied"
        assert not _can(stack, kc, verb, resource, "-n", "default"), f"{verb} {resource} granted outside"
    assert not _can(stack, kc, "list", "httproutes.gateway.networking.k8s.io", "--all-namespaces")
