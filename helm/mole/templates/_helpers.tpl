{{/*
Expand the name of the chart.
*/}}
{{- define "mole.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name, cut at 52 characters so that a component suffix ("-mlflow",
"-serve", "-pipeline-submit") still fits the 63-character limit of names and labels.
If the release name contains the chart name it is used as the full name.
*/}}
{{- define "mole.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "mole.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "mole.labels" -}}
helm.sh/chart: {{ include "mole.chart" . }}
{{ include "mole.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mole
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "mole.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mole.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Names and labels of the components.
*/}}
{{- define "mole.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "mole.fullname" .) }}
{{- end }}

{{- define "mole.serve.fullname" -}}
{{- printf "%s-serve" (include "mole.fullname" .) }}
{{- end }}

{{- define "mole.mlflow.selectorLabels" -}}
{{ include "mole.selectorLabels" . }}
app.kubernetes.io/component: mlflow
{{- end }}

{{- define "mole.serve.selectorLabels" -}}
{{ include "mole.selectorLabels" . }}
app.kubernetes.io/component: serve
{{- end }}

{{/*
The name of the ServiceAccount to use.
*/}}
{{- define "mole.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mole.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The ServiceAccount Kubeflow Pipelines runs the pipeline's pods as, in the release namespace.
*/}}
{{- define "mole.runnerServiceAccount" -}}
{{- if .Values.kubeflow.runnerServiceAccount }}
{{- .Values.kubeflow.runnerServiceAccount }}
{{- else if eq .Values.kubeflow.mode "multiUser" }}
{{- print "default-editor" }}
{{- else }}
{{- print "pipeline-runner" }}
{{- end }}
{{- end }}

{{/*
The Kubeflow profile namespace a multi-user run is submitted to: the release namespace.
*/}}
{{- define "mole.kfpNamespace" -}}
{{- if eq .Values.kubeflow.mode "multiUser" }}
{{- default .Release.Namespace .Values.pipelineSubmit.namespace }}
{{- end }}
{{- end }}

{{/*
Images.
*/}}
{{- define "mole.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "mole.mlflow.image" -}}
{{- if .Values.mlflow.image.digest }}
{{- printf "%s@%s" .Values.mlflow.image.repository .Values.mlflow.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.mlflow.image.repository .Values.mlflow.image.tag }}
{{- end }}
{{- end }}

{{/*
The generation container's arguments and environment: one definition for the Deployment and the KServe
InferenceService, so that both run the same command on the same image.
*/}}
{{- define "mole.serve.args" -}}
{{- $s := .Values.serve -}}
- serve
- --model={{ default (printf "models:/%s@%s" $s.model.name $s.model.alias) $s.model.uri }}
- --host=0.0.0.0
- --port={{ $s.port }}
- --max-queue={{ $s.maxQueue }}
- --concurrency={{ $s.concurrency }}
- --request-timeout={{ $s.requestTimeout }}
- --shutdown-timeout={{ $s.shutdownTimeout }}
{{- if $s.compile }}
- --compile
{{- end }}
{{- if and (gt (int $s.followAliasSeconds) 0) (not $s.model.uri) }}
- --follow-alias={{ $s.followAliasSeconds }}
{{- end }}
{{- end }}

{{- define "mole.serve.env" -}}
{{ include "mole.trackingEnv" . }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- with .Values.serve.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Replicas of the generation Deployment. Waiting for a champion: zero on install, and zero for as long as the
live object says so (the promote step scales it up); afterwards, with an autoscaler, the live count (the HPA
owns it); else serve.replicaCount. `helm template` sees no live object.
*/}}
{{- define "mole.serve.replicas" -}}
{{- $s := .Values.serve }}
{{- $live := lookup "apps/v1" "Deployment" .Release.Namespace (include "mole.serve.fullname" .) }}
{{- $liveReplicas := -1 }}
{{- if $live }}
{{- $liveReplicas = int (default 0 $live.spec.replicas) }}
{{- end }}
{{- if and $s.waitForChampion (le $liveReplicas 0) }}
{{- 0 }}
{{- else if and $s.autoscaling.enabled (gt $liveReplicas 0) }}
{{- $liveReplicas }}
{{- else }}
{{- $s.replicaCount }}
{{- end }}
{{- end }}

{{/*
The MLflow tracking URI the mole pods use.
*/}}
{{- define "mole.trackingUri" -}}
{{- if .Values.tracking.uri }}
{{- .Values.tracking.uri }}
{{- else if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "mole.mlflow.fullname" .) .Release.Namespace (int .Values.mlflow.service.port) }}
{{- else }}
{{- fail "tracking.uri must be set when mlflow.enabled is false: the generation service and the pipeline need an MLflow server" }}
{{- end }}
{{- end }}

{{/*
Environment of the mole pods that talk to MLflow: the URI, and the user from a Secret.
*/}}
{{- define "mole.trackingEnv" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "mole.trackingUri" . | quote }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.tracking.existingSecret.name | quote }}
      key: {{ .Values.tracking.existingSecret.usernameKey | quote }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.tracking.existingSecret.name | quote }}
      key: {{ .Values.tracking.existingSecret.passwordKey | quote }}
{{- end }}

{{/*
Host headers the MLflow server accepts: the Service's in-cluster names (with and without a port), the ingress
host and the extra ones from values. MLflow matches the whole Host header, port included.
*/}}
{{- define "mole.mlflow.allowedHosts" -}}
{{- $svc := include "mole.mlflow.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $hosts := list }}
{{- range $name := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) }}
{{- $hosts = append $hosts $name }}
{{- $hosts = append $hosts (printf "%s:*" $name) }}
{{- end }}
{{- if .Values.mlflow.ingress.enabled }}
{{- $hosts = append $hosts .Values.mlflow.ingress.host }}
{{- end }}
{{- range .Values.mlflow.allowedHosts }}
{{- if eq . "*" }}
{{- fail "mlflow.allowedHosts: \"*\" would switch off MLflow's Host header check; list the host names instead" }}
{{- end }}
{{- $hosts = append $hosts . }}
{{- end }}
{{- join "," $hosts }}
{{- end }}

{{/*
The MLflow backend store URI. PostgreSQL credentials are never part of it: libpq reads PGUSER / PGPASSWORD.
*/}}
{{- define "mole.mlflow.postgresUri" -}}
{{- $pg := .root.Values.mlflow.backendStore.postgres }}
{{- printf "postgresql://%s:%d/%s?sslmode=%s" $pg.host (int $pg.port) .database $pg.sslmode }}
{{- end }}

{{- define "mole.mlflow.backendStoreUri" -}}
{{- if eq .Values.mlflow.backendStore.type "postgres" }}
{{- include "mole.mlflow.postgresUri" (dict "root" . "database" .Values.mlflow.backendStore.postgres.database) }}
{{- else }}
{{- print "sqlite:////mlflow/data/mlflow.db" }}
{{- end }}
{{- end }}

{{- define "mole.mlflow.authDatabaseUri" -}}
{{- if eq .Values.mlflow.backendStore.type "postgres" }}
{{- $pg := .Values.mlflow.backendStore.postgres }}
{{- include "mole.mlflow.postgresUri" (dict "root" . "database" (default $pg.database $pg.authDatabase)) }}
{{- else }}
{{- print "sqlite:////mlflow/data/basic_auth.db" }}
{{- end }}
{{- end }}

{{- define "mole.mlflow.artifactsDestination" -}}
{{- if .Values.mlflow.artifacts.s3.enabled }}
{{- $s3 := .Values.mlflow.artifacts.s3 }}
{{- printf "s3://%s/%s" $s3.bucket $s3.prefix | trimSuffix "/" }}
{{- else }}
{{- print "/mlflow/artifacts" }}
{{- end }}
{{- end }}

{{/*
Cross-field checks the schema cannot express; each failure names the values to set.
*/}}
{{- define "mole.validate" -}}
{{- $kf := .Values.kubeflow }}
{{- if and (eq $kf.mode "standalone") (ne .Release.Namespace $kf.namespace) }}
{{- fail (printf "standalone Kubeflow Pipelines runs the pipeline's pods in namespace %q, where they need this release's workspace claim, ConfigMap, Secrets and RoleBinding: install with -n %s (or set kubeflow.namespace to where your KFP runs pods, or kubeflow.mode=multiUser and install into the profile namespace)" $kf.namespace $kf.namespace) }}
{{- end }}
{{- if and (eq $kf.mode "multiUser") .Values.pipelineSubmit.namespace (ne .Values.pipelineSubmit.namespace .Release.Namespace) }}
{{- fail (printf "pipelineSubmit.namespace %q: multi-user Kubeflow Pipelines runs the pipeline's pods in the profile namespace it is submitted to, so it must be the release namespace %q (install the chart into the profile namespace)" .Values.pipelineSubmit.namespace .Release.Namespace) }}
{{- end }}
{{- $perNode := int .Values.gpuPool.gpusPerNode }}
{{- if and .Values.serve.enabled (gt (int .Values.serve.gpu.count) $perNode) }}
{{- fail (printf "serve.gpu.count=%d cannot be scheduled: a node of the GPU pool has gpuPool.gpusPerNode=%d GPUs" (int .Values.serve.gpu.count) $perNode) }}
{{- end }}
{{- with .Values.pipelineSubmit.parameters.gpus }}
{{- if gt (int .) $perNode }}
{{- fail (printf "pipelineSubmit.parameters.gpus=%d cannot be scheduled: a node of the GPU pool has gpuPool.gpusPerNode=%d GPUs (more GPUs for stage 1: stage1_launcher=trainjob with stage1_nodes)" (int .) $perNode) }}
{{- end }}
{{- end }}
{{- if and .Values.serve.kserve.enabled (eq .Values.serve.kserve.deploymentMode "RawDeployment") (lt (int .Values.serve.kserve.minReplicas) 1) }}
{{- fail "serve.kserve.minReplicas=0 (scale to zero) needs serve.kserve.deploymentMode=Serverless (Knative)" }}
{{- end }}
{{- with .Values.serve.autoscaling }}
{{- if and .enabled (gt (int .minReplicas) (int .maxReplicas)) }}
{{- fail (printf "serve.autoscaling.minReplicas=%d is above serve.autoscaling.maxReplicas=%d" (int .minReplicas) (int .maxReplicas)) }}
{{- end }}
{{- end }}
{{- if not .Values.tracking.existingSecret.name }}
{{- fail "tracking.existingSecret.name must name the Secret with the MLflow user of the mole pods" }}
{{- end }}
{{- $m := .Values.mlflow }}
{{- if $m.enabled }}
{{- if not $m.auth.existingSecret.name }}
{{- fail "mlflow.auth.existingSecret.name must name the Secret with the MLflow admin user and Flask secret key (the chart creates no passwords)" }}
{{- end }}
{{- if eq $m.backendStore.type "postgres" }}
{{- if not $m.backendStore.postgres.host }}
{{- fail "mlflow.backendStore.postgres.host must be set when mlflow.backendStore.type is postgres" }}
{{- end }}
{{- if not $m.backendStore.postgres.existingSecret.name }}
{{- fail "mlflow.backendStore.postgres.existingSecret.name must name the Secret with the PostgreSQL credentials" }}
{{- end }}
{{- else if not $m.persistence.enabled }}
{{- fail "mlflow.persistence.enabled must be true with the sqlite backend store (or set mlflow.backendStore.type=postgres)" }}
{{- end }}
{{- if $m.artifacts.s3.enabled }}
{{- if not $m.artifacts.s3.bucket }}
{{- fail "mlflow.artifacts.s3.bucket must be set when mlflow.artifacts.s3.enabled is true" }}
{{- end }}
{{- if not $m.artifacts.s3.existingSecret.name }}
{{- fail "mlflow.artifacts.s3.existingSecret.name must name the Secret with the S3 access key pair" }}
{{- end }}
{{- else if not $m.persistence.enabled }}
{{- fail "mlflow.persistence.enabled must be true with local artifacts (or set mlflow.artifacts.s3.enabled=true)" }}
{{- end }}
{{- if and (gt (int $m.replicaCount) 1) (or (ne $m.backendStore.type "postgres") (not $m.artifacts.s3.enabled)) }}
{{- fail "mlflow.replicaCount > 1 needs mlflow.backendStore.type=postgres and mlflow.artifacts.s3.enabled=true (sqlite and the artifact volume are single-writer)" }}
{{- end }}
{{- if and $m.ingress.enabled (not $m.ingress.host) }}
{{- fail "mlflow.ingress.host must be set when mlflow.ingress.enabled is true" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The pipeline parameters the submit Job passes: what this release knows (image, namespace, the names of the
workspace claim, ConfigMap and Secrets, the GPU pool and its GPUs per node), overridden by
pipelineSubmit.parameters.
*/}}
{{- define "mole.pipelineParameters" -}}
{{- $params := dict
  "image" (include "mole.image" .)
  "namespace" .Release.Namespace
  "gpus_per_node" (int .Values.gpuPool.gpusPerNode)
  "workspace_pvc" .Values.pipeline.workspace.name
  "config_map" .Values.pipeline.configMap.name
  "mlflow_secret" .Values.tracking.existingSecret.name
  "s3_secret" .Values.pipeline.s3SecretName
  "tolerations" .Values.gpuPool.tolerations
}}
{{- with .Values.gpuPool.nodeSelector }}
{{- $_ := set $params "node_selector" . }}
{{- end }}
{{- if and .Values.serve.enabled (not .Values.serve.kserve.enabled) }}
{{- $_ := set $params "serve_deployment" (include "mole.serve.fullname" .) }}
{{- $_ := set $params "serve_replicas" (int .Values.serve.replicaCount) }}
{{- end }}
{{- $params = merge (deepCopy .Values.pipelineSubmit.parameters) $params }}
{{- range $name, $value := $params }}
{{- if or (kindIs "map" $value) (kindIs "slice" $value) }}
- {{ printf "%s=%s" $name (toJson $value) | quote }}
{{- else }}
- {{ printf "%s=%v" $name $value | quote }}
{{- end }}
{{- end }}
{{- end }}
