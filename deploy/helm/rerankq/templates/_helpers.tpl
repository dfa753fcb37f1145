{{/* Names and labels. */}}
{{- define "rerankq.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 52 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "rerankq.labels" -}}
app.kubernetes.io/name: rerankq
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The selector of one component: (dict "root" $ "component" "watchdog"). */}}
{{- define "rerankq.selector" -}}
app.kubernetes.io/name: rerankq
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "rerankq.image" -}}
{{- $image := .image -}}
{{ printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) }}
{{- end -}}

{{/* The broker URL: a Redis URL, or the sentinels' (`sentinel://h1:26379;sentinel://h2:26379`). */}}
{{- define "rerankq.brokerUrl" -}}
{{- if .Values.redis.sentinel.hosts -}}
{{- $urls := list -}}
{{- range .Values.redis.sentinel.hosts }}{{ $urls = append $urls (printf "sentinel://%s" .) }}{{ end -}}
{{ join ";" $urls }}
{{- else -}}
{{ required "set redis.url (or redis.sentinel.hosts)" .Values.redis.url }}
{{- end -}}
{{- end -}}

{{/* What every rerankq process reads: Redis (its password from a Secret, never a ConfigMap), metrics on the pod's
address, and the settings given. */}}
{{- define "rerankq.env" -}}
- name: RERANKQ_BROKER_URL
  value: {{ include "rerankq.brokerUrl" . | quote }}
{{- if .Values.redis.sentinel.hosts }}
- name: RERANKQ_SENTINEL_MASTER
  value: {{ .Values.redis.sentinel.master | quote }}
{{- end }}
{{- if .Values.redis.passwordSecret.name }}
- name: RERANKQ_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.passwordSecret.name }}
      key: {{ .Values.redis.passwordSecret.key }}
{{- end }}
- name: RERANKQ_METRICS_ADDRESS
  value: "0.0.0.0"
- name: RERANKQ_GPU_QUEUE
  value: {{ .Values.queues.gpu | quote }}
- name: RERANKQ_CPU_QUEUE
  value: {{ .Values.queues.cpu | quote }}
- name: RERANKQ_MODELS
  value: {{ include "rerankq.models" . | quote }}
{{- range $name, $value := .Values.settings }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* Pod and container security: non-root (the image's user 10001), nothing to escalate, a read-only root
filesystem with /tmp and the model cache writable. */}}
{{- define "rerankq.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "rerankq.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "rerankq.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The served models (tasks/models.py, RERANKQ_MODELS) as JSON, from the worker entries: one per servedName (or
model), the first the default, each on its entry's queue. Entries of one model must agree on its queue. */}}
{{- define "rerankq.models" -}}
{{- $models := list -}}
{{- $queues := dict -}}
{{- range $i, $worker := .Values.workers -}}
{{- $name := default $worker.model $worker.servedName -}}
{{- $queue := include "rerankq.workerQueue" (dict "worker" $worker "root" $) -}}
{{- if hasKey $queues $name -}}
{{- if ne (get $queues $name) $queue -}}
{{- fail (printf "workers: the entries serving %s name two queues (%s, %s): give them one" $name (get $queues $name) $queue) -}}
{{- end -}}
{{- else -}}
{{- $_ := set $queues $name $queue -}}
{{- $models = append $models (dict "name" $name "model" $worker.model "queue" $queue "aliases" ($worker.aliases | default list)) -}}
{{- end -}}
{{- end -}}
{{- toJson $models -}}
{{- end -}}

{{/* A worker entry's queue: its own, else queues.gpu for the default model, else <queues.gpu>.<name's last part>
(as tasks/models.py names it). */}}
{{- define "rerankq.workerQueue" -}}
{{- $name := default .worker.model .worker.servedName -}}
{{- $first := index .root.Values.workers 0 -}}
{{- if .worker.queue -}}{{ .worker.queue }}
{{- else if eq $name (default $first.model $first.servedName) -}}{{ .root.Values.queues.gpu }}
{{- else -}}{{ printf "%s.%s" .root.Values.queues.gpu (regexReplaceAll "[^A-Za-z0-9._-]" (last (splitList "/" (trimSuffix "/" $name))) "-") }}
{{- end -}}
{{- end -}}
