{{/* Names */}}
{{- define "aleno-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "aleno-bridge.fullname" -}}
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

{{- define "aleno-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "aleno-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aleno-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "aleno-bridge.labels" -}}
helm.sh/chart: {{ include "aleno-bridge.chart" . }}
{{ include "aleno-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "aleno-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "aleno-bridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "aleno-bridge.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* "true" when the chart renders the sharded StatefulSet layout, "" otherwise. */}}
{{- define "aleno-bridge.sharded" -}}
{{- if or .Values.sharding.enabled (gt (int .Values.shards) 1) }}true{{ end }}
{{- end }}

{{/* Total number of pods. */}}
{{- define "aleno-bridge.replicas" -}}
{{- if include "aleno-bridge.sharded" . }}
{{- mul (int .Values.shards) (int .Values.replicasPerShard) }}
{{- else }}
{{- int .Values.replicasPerShard }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the environment (chart-made or existing), "" if none. */}}
{{- define "aleno-bridge.secretName" -}}
{{- if .Values.existingSecret }}
{{- .Values.existingSecret }}
{{- else if .Values.secrets }}
{{- include "aleno-bridge.fullname" . }}
{{- end }}
{{- end }}

{{- define "aleno-bridge.configDir" -}}/etc/aleno-bridge{{- end }}

{{/*
The bridge configuration (YAML) written to the ConfigMap: the user's `config`, plus
- a console sink when no sink is configured,
- http forced to bind metrics.bindAddress:metrics.port (probes, Service, monitors),
- with sharding, source.shard = {index: ${ALENO_SHARD_INDEX}, count: shards}; the
  index comes from the pod ordinal (see shard.sh), the bridge interpolates it at start.
*/}}
{{- define "aleno-bridge.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- if not (get $cfg "sinks") }}
{{- $_ := set $cfg "sinks" (dict "console" (dict "driver" "console")) }}
{{- end }}
{{- $http := deepCopy (get $cfg "http" | default dict) }}
{{- $_ := set $http "enabled" true }}
{{- $_ := set $http "host" (toString .Values.metrics.bindAddress) }}
{{- $_ := set $http "port" (int .Values.metrics.port) }}
{{- $_ := set $cfg "http" $http }}
{{- $source := deepCopy (get $cfg "source" | default dict) }}
{{- $key := get $source "api_key" }}
{{- if and $key (not (hasPrefix "${" (toString $key))) }}
{{- fail "config.source.api_key holds a literal key: it would land in a ConfigMap. Put the key in `secrets` (or `existingSecret`) as ALENO_API_KEY and write `api_key: ${ALENO_API_KEY}`." }}
{{- end }}
{{- if include "aleno-bridge.sharded" . }}
{{- $_ := set $source "shard" (dict "index" "${ALENO_SHARD_INDEX}" "count" (int .Values.shards)) }}
{{- end }}
{{- $_ := set $cfg "source" $source }}
{{- /* the file's usual order: source, sinks, routes, then the rest */}}
{{- $first := list "source" "sinks" "routes" "http" "log" }}
{{- $out := list }}
{{- range $first }}
{{- if hasKey $cfg . }}
{{- $out = append $out (toYaml (dict . (get $cfg .))) }}
{{- end }}
{{- end }}
{{- $rest := omit $cfg "source" "sinks" "routes" "http" "log" }}
{{- if $rest }}
{{- $out = append $out (toYaml $rest) }}
{{- end }}
{{- join "\n" $out }}
{{- end }}

{{/*
shard.sh: the sharded pods' entrypoint. The pod name of a StatefulSet pod ends with its
ordinal; shard index = ordinal % ALENO_SHARD_COUNT, so pods 0..N-1 cover every shard once,
pods N..2N-1 once more, and so on (replicasPerShard pods per shard).
*/}}
{{- define "aleno-bridge.shardScript" -}}
#!/bin/sh
# Derive this pod's shard from its StatefulSet ordinal, then exec the bridge.
set -eu
ordinal="${POD_NAME##*-}"
case "$ordinal" in
  ''|*[!0-9]*)
    echo "aleno-bridge: cannot read a pod ordinal from POD_NAME='${POD_NAME}'" >&2
    exit 64
    ;;
esac
ALENO_SHARD_INDEX=$(( ordinal % ALENO_SHARD_COUNT ))
export ALENO_SHARD_INDEX
echo "aleno-bridge: pod ${POD_NAME} serves shard ${ALENO_SHARD_INDEX} of ${ALENO_SHARD_COUNT}" >&2
exec aleno-bridge "$@"
{{- end }}
