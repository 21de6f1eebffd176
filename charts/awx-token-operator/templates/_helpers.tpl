{{/* Chart name, overridable. */}}
{{- define "awx-token-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of the release's objects: the release name when it already contains the chart name. */}}
{{- define "awx-token-operator.fullname" -}}
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

{{- define "awx-token-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "awx-token-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "awx-token-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "awx-token-operator.labels" -}}
helm.sh/chart: {{ include "awx-token-operator.chart" . }}
{{ include "awx-token-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: awx-token-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "awx-token-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "awx-token-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the leader-election Lease: one per release, so two releases never share one. */}}
{{- define "awx-token-operator.leaseName" -}}
{{- include "awx-token-operator.fullname" . }}
{{- end }}

{{- define "awx-token-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The rights the operator needs in the namespaces it watches, and no more; shared by the
ClusterRole (all namespaces) and the Role (watchNamespace). The verbs follow the calls in
src/controller.rs, and tests/e2e/chart.rs runs the operator with exactly these rights:
- server-side apply is a PATCH that Kubernetes also authorizes as "create" while the object
  does not exist yet;
- the operator never updates or deletes a Secret: its own go with their AwxToken through the
  garbage collector;
- no right on awxtokens/finalizers: the ownerReferences it sets do not block owner deletion
  (blockOwnerDeletion is what would need it under OwnerReferencesPermissionEnforcement).
*/}}
{{- define "awx-token-operator.rules" -}}
# AwxTokens: their metadata listed and watched into the controller's cache, each read whole at
# its reconcile; the finalizer that revokes tokens on delete is added and removed with JSON
# patches.
- apiGroups: ["awx-token-operator.io"]
  resources: ["awxtokens"]
  verbs: ["get", "list", "watch", "patch"]
# Status is written with server-side apply on the status subresource.
- apiGroups: ["awx-token-operator.io"]
  resources: ["awxtokens/status"]
  verbs: ["patch"]
# Connections: an AwxToken's spec.connectionRef is read at each reconcile; their own reconcile
# (and the AwxTokens' re-issue on a change) watches them.
- apiGroups: ["awx-token-operator.io"]
  resources: ["awxconnections"{{ if not .Values.watchNamespace }}, "clusterawxconnections"{{ end }}]
  verbs: ["get", "list", "watch"]
# A connection's status (Ready, flavour, tokens) is written with server-side apply.
- apiGroups: ["awx-token-operator.io"]
  resources: ["awxconnections/status"{{ if not .Values.watchNamespace }}, "clusterawxconnections/status"{{ end }}]
  verbs: ["patch"]
{{- if not .Values.watchNamespace }}
# Namespaces: a ClusterAwxConnection admits AwxTokens by their namespace's labels.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get"]
{{- end }}
# Secrets: get reads the credentials and CA-bundle Secrets named by AwxTokens and the Secrets
# the operator owns; list and watch follow Secret metadata only (never data) to notice changed
# credentials and repair owned Secrets; patch writes the token Secrets with server-side apply;
# create and update write the awx-token-operator-state-<name> Secrets, each update
# conditional on the version read (so two operator processes never overwrite each other).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "update", "patch"]
{{- if .Values.rbac.ownerReferencesPermissionEnforcement }}
# The OwnerReferencesPermissionEnforcement admission plugin (on in OpenShift) lets only who may
# delete a Secret change its ownerReferences, as the operator does when an AwxToken's
# secret.deletionPolicy changes or when it repairs an owned Secret.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["delete"]
{{- end }}
# Events about AwxTokens (TokenIssued, failures): the operator creates events.k8s.io/v1
# Events and patches a repeat's count into the first one (src/controller/events.rs).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Core v1 Events: not used today; granted (write-only) so that a version writing core
# Events still reports.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.rbac.rolloutRestartTargets }}
# rolloutRestartTargets: a merge patch of one pod-template annotation restarts the workloads
# an AwxToken names (or selects by label) when its token changes; reading them tells when
# another AwxToken restarted them already and when their rollout finished.
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets", "daemonsets"]
  verbs: ["get", "list", "patch"]
{{- end }}
{{- end }}
