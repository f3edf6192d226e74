{{/*
An image reference from a {repository, tag} value; an empty tag follows the chart's appVersion
so that one chart version pins one operator and one runtime release.
*/}}
{{- define "kubelm.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .chart.AppVersion) -}}
{{- end -}}

{{/* The Secret the operator reads its connection URLs from (envFrom). */}}
{{- define "kubelm.connectionsSecret" -}}
{{- .Values.connections.existingSecret | default "kubelm-connections" -}}
{{- end -}}
