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

{{/* "true" when the chart renders a StatefulSet: sharded, or with a persistent volume per
pod for the sinks' disk spools (a Deployment's pods cannot each own a claim). */}}
{{- define "aleno-bridge.statefulset" -}}
{{- if or (include "aleno-bridge.sharded" .) .Values.persistence.enabled }}true{{ end }}
{{- end }}

{{/* Refuse a spool the pod would lose or could not write: a sink with buffer.disk needs
persistence.enabled and its path under persistence.mountPath (the root file system is
read-only). */}}
{{- define "aleno-bridge.checkPersistence" -}}
{{- $p := .Values.persistence }}
{{- $mount := trimSuffix "/" (toString $p.mountPath) }}
{{- range $name, $sink := (.Values.config.sinks | default dict) }}
{{- $disk := and (kindIs "map" $sink) (dig "buffer" "disk" nil $sink) }}
{{- if $disk }}
{{- if not $p.enabled }}
{{- fail (printf "config.sinks.%s.buffer.disk: a spool needs a volume that outlives the pod: set persistence.enabled: true and point buffer.disk.path under persistence.mountPath (e.g. %s/%s)" $name $mount $name) }}
{{- end }}
{{- $path := toString (get $disk "path") }}
{{- if not (hasPrefix (printf "%s/" $mount) $path) }}
{{- fail (printf "config.sinks.%s.buffer.disk.path: %q is not under persistence.mountPath (%s): the container's root file system is read-only and the spool must survive the pod; use e.g. %s/%s" $name $path $mount $mount $name) }}
{{- end }}
{{- end }}
{{- end }}
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

{{/* Where the control tokens' Secret is mounted: one file per token name. */}}
{{- define "aleno-bridge.controlTokenDir" -}}/var/run/secrets/aleno-bridge/control-tokens{{- end }}

{{/* Name of the Secret holding the control tokens (chart-made or existing), "" if none. */}}
{{- define "aleno-bridge.controlTokenSecretName" -}}
{{- if .Values.control.existingTokenSecret }}
{{- .Values.control.existingTokenSecret }}
{{- else if .Values.control.tokens }}
{{- include "aleno-bridge.fullname" . }}-control-tokens
{{- end }}
{{- end }}

{{/* "true" when the control values ask for tokens or explicit anonymous scopes. */}}
{{- define "aleno-bridge.controlAuthDeclared" -}}
{{- if or .Values.control.tokens (not (kindIs "invalid" .Values.control.anonymous)) }}true{{ end }}
{{- end }}

{{/* The control listener's address: control.bindAddress, or (auto) 0.0.0.0 when tokens
or anonymous scopes are declared, 127.0.0.1 otherwise. */}}
{{- define "aleno-bridge.controlHost" -}}
{{- if .Values.control.bindAddress }}
{{- toString .Values.control.bindAddress }}
{{- else if include "aleno-bridge.controlAuthDeclared" . }}
{{- "0.0.0.0" }}
{{- else }}
{{- "127.0.0.1" }}
{{- end }}
{{- end }}

{{/* "true" when the host (name or address, the argument) is this machine only, as the
bridge's is_loopback_host judges it. */}}
{{- define "aleno-bridge.isLoopback" -}}
{{- $h := . | toString | lower | trimPrefix "[" | trimSuffix "]" | trimSuffix "." }}
{{- if or (eq $h "localhost") (hasSuffix ".localhost" $h) (regexMatch "^127\\.[0-9]+\\.[0-9]+\\.[0-9]+$" $h) (eq $h "::1") (eq $h "0:0:0:0:0:0:0:1") }}true{{ end }}
{{- end }}

{{/* "true" when the /v1 listener is on and reachable from outside the pod: then the
container and a Service publish the port and the NetworkPolicy has a rule for it. */}}
{{- define "aleno-bridge.controlExposed" -}}
{{- if and .Values.control.enabled (not (include "aleno-bridge.isLoopback" (include "aleno-bridge.controlHost" .))) }}true{{ end }}
{{- end }}

{{/* Refuse control values the bridge would refuse, or that would leak a token. */}}
{{- define "aleno-bridge.checkControl" -}}
{{- $c := .Values.control }}
{{- if and (include "aleno-bridge.controlExposed" .) (not (include "aleno-bridge.controlAuthDeclared" .)) }}
{{- fail (printf "control.bindAddress %s exposes /v1 beyond the pod without tokens: declare control.tokens (with control.existingTokenSecret or token values), or set control.anonymous explicitly (e.g. [snapshot]), or leave bindAddress empty (127.0.0.1)" (toString $c.bindAddress)) }}
{{- end }}
{{- if and $c.enabled (eq (int $c.port) (int .Values.metrics.port)) }}
{{- fail (printf "control.port and metrics.port are both %d: /v1 has its own listener, give it another port" (int $c.port)) }}
{{- end }}
{{- if and $c.existingTokenSecret (not $c.tokens) }}
{{- fail "control.existingTokenSecret is set but control.tokens is empty: list the tokens it holds (name, scopes, maxSymbols; one key per name)" }}
{{- end }}
{{- $names := dict }}
{{- $values := dict }}
{{- range $i, $t := $c.tokens }}
{{- if hasKey $names $t.name }}
{{- fail (printf "control.tokens[%d].name: %q is also the name of control.tokens[%v]" $i $t.name (get $names $t.name)) }}
{{- end }}
{{- $_ := set $names $t.name $i }}
{{- if $c.existingTokenSecret }}
{{- if $t.token }}
{{- fail (printf "control.tokens[%d] (%s) has a token although control.existingTokenSecret is set: the token comes from that Secret's key %q" $i $t.name $t.name) }}
{{- end }}
{{- else }}
{{- if not $t.token }}
{{- fail (printf "control.tokens[%d] (%s) has no token: set control.tokens[%d].token (the chart stores it in a Secret) or control.existingTokenSecret" $i $t.name $i) }}
{{- end }}
{{- $v := sha256sum (toString $t.token) }}
{{- if hasKey $values $v }}
{{- fail (printf "control.tokens[%d].token: the same token as control.tokens[%v]" $i (get $values $v)) }}
{{- end }}
{{- $_ := set $values $v $i }}
{{- end }}
{{- end }}
{{- $auth := get (get (.Values.config | default dict) "control" | default dict) "auth" | default dict }}
{{- if or (hasKey $auth "tokens") (hasKey $auth "anonymous") }}
{{- fail "config.control.auth.tokens / anonymous are set by the chart: use control.tokens (token values go into a Secret, not the ConfigMap) and control.anonymous" }}
{{- end }}
{{- end }}

{{/*
The bridge configuration (YAML) written to the ConfigMap: the user's `config`, plus
- a console sink when no sink is configured,
- http forced to bind metrics.bindAddress:metrics.port (probes, Service, monitors),
- control.http (the /v1 listener) and control.auth.tokens/anonymous from `control`;
  each token is a token_file in the mounted token Secret, never a value,
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
{{- include "aleno-bridge.checkControl" . }}
{{- include "aleno-bridge.checkPersistence" . }}
{{- $control := deepCopy (get $cfg "control" | default dict) }}
{{- $chttp := deepCopy (get $control "http" | default dict) }}
{{- $_ := set $chttp "enabled" (.Values.control.enabled | default false) }}
{{- $_ := set $chttp "host" (include "aleno-bridge.controlHost" .) }}
{{- $_ := set $chttp "port" (int .Values.control.port) }}
{{- $_ := set $chttp "allowed_origins" (.Values.control.allowedOrigins | default list) }}
{{- $_ := set $control "http" $chttp }}
{{- $auth := deepCopy (get $control "auth" | default dict) }}
{{- $tokenDir := include "aleno-bridge.controlTokenDir" . }}
{{- $tokens := list }}
{{- range .Values.control.tokens }}
{{- $t := dict "name" .name "token_file" (printf "%s/%s" $tokenDir .name) }}
{{- with .scopes }}
{{- $_ := set $t "scopes" . }}
{{- end }}
{{- with .maxSymbols }}
{{- $_ := set $t "max_symbols" (int .) }}
{{- end }}
{{- $tokens = append $tokens $t }}
{{- end }}
{{- if $tokens }}
{{- $_ := set $auth "tokens" $tokens }}
{{- end }}
{{- if not (kindIs "invalid" .Values.control.anonymous) }}
{{- $_ := set $auth "anonymous" .Values.control.anonymous }}
{{- end }}
{{- if $auth }}
{{- $_ := set $control "auth" $auth }}
{{- end }}
{{- $_ := set $cfg "control" $control }}
{{- /* the file's usual order: source, sinks, routes, then the rest */}}
{{- $first := list "source" "sinks" "routes" "http" "control" "log" }}
{{- $out := list }}
{{- range $first }}
{{- if hasKey $cfg . }}
{{- $out = append $out (toYaml (dict . (get $cfg .))) }}
{{- end }}
{{- end }}
{{- $rest := omit $cfg "source" "sinks" "routes" "http" "control" "log" }}
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
