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
