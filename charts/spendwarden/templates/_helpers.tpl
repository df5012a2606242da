{{/* Chart name, overridable. */}}
{{- define "spendwarden.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name used as object name prefix: <release>-<chart>, or just <release> when it already
contains the chart name. Truncated to 63 characters (DNS label limit of Service names).
*/}}
{{- define "spendwarden.fullname" -}}
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

{{- define "spendwarden.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "spendwarden.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spendwarden.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "spendwarden.labels" -}}
helm.sh/chart: {{ include "spendwarden.chart" . }}
{{ include "spendwarden.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: spendwarden
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The ServiceAccount the operator runs as (best practice: separate from rbac.create). */}}
{{- define "spendwarden.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spendwarden.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "spendwarden.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The proxy sidecar image: the same image unless overridden. */}}
{{- define "spendwarden.proxyImage" -}}
{{- printf "%s:%s" (.Values.proxy.image.repository | default .Values.image.repository) (.Values.proxy.image.tag | default .Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "spendwarden.webhookCertSecretName" -}}
{{- .Values.webhooks.certSecretName | default (printf "%s-webhook-tls" (include "spendwarden.fullname" .)) }}
{{- end }}

{{- define "spendwarden.webhookServiceName" -}}
{{- printf "%s-webhook" (include "spendwarden.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Gateway mode: the namespace of the shared gateway pool (default: the release namespace). */}}
{{- define "spendwarden.gatewayNamespace" -}}
{{- .Values.gateway.namespace | default .Release.Namespace }}
{{- end }}

{{- define "spendwarden.gatewaySelectorLabels" -}}
app.kubernetes.io/name: spendwarden
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "spendwarden.gatewayLabels" -}}
helm.sh/chart: {{ include "spendwarden.chart" . }}
{{ include "spendwarden.gatewaySelectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: spendwarden
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
