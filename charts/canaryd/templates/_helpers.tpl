{{/* Chart name. */}}
{{- define "canaryd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the release name when it already contains the chart name. */}}
{{- define "canaryd.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "canaryd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "canaryd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "canaryd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "canaryd.labels" -}}
helm.sh/chart: {{ include "canaryd.chart" . }}
{{ include "canaryd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: canaryd
{{- end }}

{{- define "canaryd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "canaryd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "canaryd.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Namespaces the daemon watches (CANARYD_NAMESPACES); empty list = all namespaces. */}}
{{- define "canaryd.watchNamespaces" -}}
{{- if eq .Values.rbac.scope "namespaced" }}
{{- if not .Values.rbac.namespaces }}
{{- fail "rbac.scope=namespaced needs rbac.namespaces: the namespaces canaryd may manage routes in" }}
{{- end }}
{{- range .Values.watchNamespaces }}
{{- if not (has . $.Values.rbac.namespaces) }}
{{- fail (printf "watchNamespaces: %q is not in rbac.namespaces, so canaryd would have no rights there" .) }}
{{- end }}
{{- end }}
{{- toJson (default .Values.rbac.namespaces .Values.watchNamespaces) }}
{{- else }}
{{- toJson .Values.watchNamespaces }}
{{- end }}
{{- end }}

{{/* The Lease names (canaryd.core.shards.lease_names): leaseName, or leaseName-shard-<i> per shard. JSON list. */}}
{{- define "canaryd.leaseNames" -}}
{{- $base := .Values.leaderElection.leaseName }}
{{- $n := int .Values.shards }}
{{- if le $n 1 }}
{{- list $base | toJson }}
{{- else }}
{{- $names := list }}
{{- range $i := until $n }}
{{- $names = append $names (printf "%s-shard-%d" $base $i) }}
{{- end }}
{{- $names | toJson }}
{{- end }}
{{- end }}

{{/* The settings file (config/canaryd.yaml format): structured settings from values. */}}
{{- define "canaryd.settingsFile" -}}
{{- $d := .Values.defaults }}
{{- $prev := 0 }}
{{- range $d.steps }}
{{- if le (int64 .) (int64 $prev) }}
{{- fail (printf "defaults.steps must increase strictly (the rule of canaryd.io/steps): %v then %v in %v" $prev . $d.steps) }}
{{- end }}
{{- $prev = . }}
{{- end }}
{{- $p := .Values.prometheus }}
{{- $defaults := dict
  "steps" $d.steps
  "interval_s" (float64 $d.intervalSeconds)
  "failure_threshold" (int64 $d.failureThreshold)
  "analysis_interval_s" (float64 $d.analysisIntervalSeconds)
  "ready_deadline_s" (float64 $d.readyDeadlineSeconds)
  "analysis" $d.analysis
  "success_rate_min" (float64 $d.successRateMin)
  "latency_quantile" (float64 $d.latencyQuantile)
  "min_requests" (int64 $d.minRequests)
  "max_inconclusive" (int64 $d.maxInconclusive)
  "on_inconclusive" $d.onInconclusive
  "confidence" (float64 $d.confidence)
  "tolerance_pct" (float64 $d.tolerancePct)
  "max_errors" (int64 $d.maxErrors)
  "count_4xx" $d.count4xx }}
{{- if not (kindIs "invalid" $d.latencyMaxMs) }}
{{- $_ := set $defaults "latency_max_ms" (float64 $d.latencyMaxMs) }}
{{- end }}
{{- $prom := dict
  "url" $p.url
  "insecure_skip_verify" $p.insecureSkipVerify
  "headers" ($p.headers | default dict)
  "timeout_s" (float64 $p.timeoutSeconds)
  "max_concurrency" (int64 $p.maxConcurrency)
  "envoy_cluster_pattern" $p.envoyClusterPattern
  "envoy_cluster_label" $p.envoyClusterLabel }}
{{- $le := .Values.leaderElection }}
{{- if ge (int64 $le.renewSeconds) (int64 $le.leaseDurationSeconds) }}
{{- fail "leaderElection.renewSeconds must be less than leaderElection.leaseDurationSeconds" }}
{{- end }}
{{- $settings := dict
  "max_concurrent_rollouts" (int64 .Values.maxConcurrentRollouts)
  "lease_duration_s" (float64 $le.leaseDurationSeconds)
  "lease_renew_s" (float64 $le.renewSeconds)
  "http_port" (int64 .Values.service.port)
  "defaults" $defaults
  "prometheus" $prom }}
{{- $merged := mustMergeOverwrite $settings (deepCopy (.Values.extraConfig | default dict)) }}
{{- toYaml $merged }}
{{- end }}

{{/* The metric templates file, in the format canaryd reads (config/metric-templates.yaml; canaryd/metrics/custom.py):
a top-level `templates:` mapping of name -> {requests, errors[, latency_ms]}. */}}
{{- define "canaryd.metricTemplatesFile" -}}
{{- toYaml (dict "templates" .Values.metricTemplates.templates) }}
{{- end }}

{{- define "canaryd.metricTemplatesEnabled" -}}
{{- if or .Values.metricTemplates.existingConfigMap .Values.metricTemplates.templates }}true{{ end }}
{{- end }}

{{/*
Rules canaryd needs on routes, endpoint slices, services and events (ClusterRole or Role):
exactly the calls the daemon makes, each proven needed by tests/integration/test_rbac_proof.py
(docs/rbac.md). httproutes: informer list+watch, guarded JSON patch, get to re-read after a
conflict. services, endpointslices: informer list+watch only (no get). events: core/v1 create
only (never events.k8s.io, never patch).
*/}}
{{- define "canaryd.rules" -}}
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
