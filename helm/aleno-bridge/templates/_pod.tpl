{{/* The pod template shared by the Deployment and the StatefulSet. */}}
{{- define "aleno-bridge.podTemplate" -}}
{{- $sharded := include "aleno-bridge.sharded" . -}}
{{- $secretName := include "aleno-bridge.secretName" . -}}
{{- $configDir := include "aleno-bridge.configDir" . -}}
{{- $tokenSecret := include "aleno-bridge.controlTokenSecretName" . -}}
metadata:
  labels:
    {{- include "aleno-bridge.selectorLabels" . | nindent 4 }}
    app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
    {{- with .Values.commonLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    {{- if eq .Values.configReload "roll" }}
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- else }}
    aleno.ai/config-reload: hot
    {{- end }}
    {{- if and .Values.secrets (not .Values.existingSecret) }}
    checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- end }}
    {{- if and .Values.control.tokens (not .Values.control.existingTokenSecret) }}
    checksum/control-tokens: {{ include (print $.Template.BasePath "/secret-control-tokens.yaml") . | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "aleno-bridge.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ int .Values.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: bridge
      image: {{ include "aleno-bridge.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      {{- if $sharded }}
      command: ["/bin/sh", "{{ $configDir }}/shard.sh"]
      {{- end }}
      args: ["run", "-c", "{{ $configDir }}/config.yaml"]
      env:
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        {{- if $sharded }}
        - name: ALENO_SHARD_COUNT
          value: {{ int .Values.shards | quote }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if or $secretName .Values.extraEnvFrom }}
      envFrom:
        {{- if $secretName }}
        - secretRef:
            name: {{ $secretName }}
        {{- end }}
        {{- with .Values.extraEnvFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      ports:
        - name: http-metrics
          containerPort: {{ int .Values.metrics.port }}
          protocol: TCP
        {{- if include "aleno-bridge.controlExposed" . }}
        - name: http-control
          containerPort: {{ int .Values.control.port }}
          protocol: TCP
        {{- end }}
      {{- with .Values.livenessProbe }}
      livenessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.readinessProbe }}
      readinessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: {{ $configDir }}
          readOnly: true
        - name: tmp
          mountPath: /tmp
        {{- if .Values.persistence.enabled }}
        # the sinks' disk spools (buffer.disk.path under it); the claim of the StatefulSet
        - name: spool
          mountPath: {{ .Values.persistence.mountPath }}
        {{- end }}
        {{- if $tokenSecret }}
        - name: control-tokens
          mountPath: {{ include "aleno-bridge.controlTokenDir" . }}
          readOnly: true
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "aleno-bridge.fullname" . }}
    - name: tmp
      emptyDir: {{ if .Values.tmpSizeLimit }}{sizeLimit: {{ .Values.tmpSizeLimit }}}{{ else }}{}{{ end }}
    {{- if $tokenSecret }}
    # one file per token name, read by the bridge as control.auth.tokens[].token_file
    - name: control-tokens
      secret:
        secretName: {{ $tokenSecret }}
        defaultMode: 288  # 0440: root and the pod's fsGroup
        items:
          {{- range .Values.control.tokens }}
          - key: {{ .name | quote }}
            path: {{ .name | quote }}
          {{- end }}
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
