{{/* The chart name, or nameOverride. */}}
{{- define "deployment-cleanup.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The full name of the release's objects: fullnameOverride, else "<release>-<chart>" (the
release name alone when it already contains the chart name). */}}
{{- define "deployment-cleanup.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "deployment-cleanup.selectorLabels" -}}
app.kubernetes.io/name: {{ include "deployment-cleanup.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "deployment-cleanup.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "deployment-cleanup.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "deployment-cleanup.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "deployment-cleanup.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "deployment-cleanup.peeringName" -}}
{{- default (include "deployment-cleanup.fullname" .) .Values.peering.name -}}
{{- end -}}

{{- define "deployment-cleanup.metricsServiceName" -}}
{{- printf "%s-metrics" (include "deployment-cleanup.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "deployment-cleanup.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The namespaces watched in namespaced mode; fails early when there are none. */}}
{{- define "deployment-cleanup.watchNamespaces" -}}
{{- if not .Values.watchNamespaces -}}
{{- fail "watchNamespaces: list at least one namespace when rbac.clusterWide is false" -}}
{{- end -}}
{{- toJson .Values.watchNamespaces -}}
{{- end -}}

{{/* The operator's command-line arguments, one YAML list item each ("--flag=value", so that a
negative priority cannot be taken for a flag). */}}
{{- define "deployment-cleanup.args" -}}
- operator
{{- if .Values.rbac.clusterWide }}
{{- if .Values.watchNamespaces }}
{{- fail "watchNamespaces is set but rbac.clusterWide is true (every namespace is watched): set rbac.clusterWide=false to watch only those namespaces, or empty watchNamespaces" }}
{{- end }}
- --all-namespaces
{{- else }}
{{- range (include "deployment-cleanup.watchNamespaces" . | fromJsonArray) }}
- {{ printf "--namespace=%s" . | quote }}
{{- end }}
{{- end }}
{{- if .Values.peering.enabled }}
- {{ printf "--peering=%s" (include "deployment-cleanup.peeringName" .) | quote }}
- {{ printf "--priority=%d" (int .Values.peering.priority) | quote }}
{{- else }}
- --standalone
{{- end }}
- {{ printf "--liveness=http://0.0.0.0:%d/healthz" (int .Values.health.port) | quote }}
- {{ printf "--metrics-port=%d" (ternary (int .Values.metrics.port) 0 .Values.metrics.enabled) | quote }}
- {{ printf "--kill-switch=%s/%s" .Release.Namespace .Values.killSwitch.configMapName | quote }}
{{- if not .Values.rbac.discovery }}
- --static-discovery
{{- end }}
{{- with .Values.operator.tickSeconds }}
- {{ printf "--tick-seconds=%v" . | quote }}
{{- end }}
{{- if .Values.operator.verbose }}
- --verbose
{{- end }}
{{- range .Values.operator.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* A duration such as 36h, 90m, 2d or 45s in seconds, for PromQL arithmetic. */}}
{{- define "deployment-cleanup.seconds" -}}
{{- $n := regexFind "^[0-9]+" . | int -}}
{{- $unit := regexFind "[smhd]$" . -}}
{{- $factor := get (dict "s" 1 "m" 60 "h" 3600 "d" 86400) $unit -}}
{{- mul $n $factor -}}
{{- end -}}

{{/* PromQL label matchers selecting this release's metrics. */}}
{{- define "deployment-cleanup.metricsSelector" -}}
{{- default (printf "job=%q" (include "deployment-cleanup.metricsServiceName" .)) .Values.prometheusRule.metricsSelector -}}
{{- end -}}

{{/* RBAC rules for the DeploymentCleanups of one scope (a namespace, or the whole cluster):
exactly what the operator and kopf do there, found by running the operator with these rules and
taking each verb away in turn (tests/e2e/test_chart.py runs it with them). No "get": kopf lists and
watches, and the operator never reads a single DeploymentCleanup. */}}
{{- define "deployment-cleanup.resourceRules" -}}
# kopf lists and watches DeploymentCleanups (its timers), and patches them for its own bookkeeping
# (annotations under deployment-cleanup.dev/).
- apiGroups: ["deployment-cleanup.dev"]
  resources: ["deploymentcleanups"]
  verbs: ["list", "watch", "patch"]
# The operator writes status only through the status subresource (a merge patch).
- apiGroups: ["deployment-cleanup.dev"]
  resources: ["deploymentcleanups/status"]
  verbs: ["patch"]
# Events about the resources (Planned, Blocked, ...), posted through kopf: create only.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# The urlSecretRef/tokenSecretRef Secrets named by a DeploymentCleanup, read by name: no list or
# watch, so the operator cannot enumerate Secrets.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end -}}

{{/* kopf peering: it lists and watches the peering objects of its scope and writes its
keep-alive only into the one it is told to use. */}}
{{- define "deployment-cleanup.peeringRules" -}}
{{- $resource := ternary "clusterkopfpeerings" "kopfpeerings" .Values.rbac.clusterWide -}}
- apiGroups: ["kopf.dev"]
  resources: [{{ $resource | quote }}]
  verbs: ["list", "watch"]
- apiGroups: ["kopf.dev"]
  resources: [{{ $resource | quote }}]
  resourceNames: [{{ include "deployment-cleanup.peeringName" . | quote }}]
  verbs: ["patch"]
{{- end -}}

{{- define "deployment-cleanup.subjects" -}}
- kind: ServiceAccount
  name: {{ include "deployment-cleanup.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end -}}
