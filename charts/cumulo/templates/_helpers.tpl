{{/*
Names are fixed, not prefixed with the release: the agents' node-restriction policy (agent-restriction.yaml)
names the ServiceAccount cumulo-system/cumulo-agent, and the controller and agents find their Leases in
cumulo-system. One Cumulo per cluster (a region), so one release.
*/}}

{{- define "cumulo.namespace" -}}
{{- if ne .Release.Namespace "cumulo-system" -}}
{{- fail (printf "install Cumulo into the namespace cumulo-system (helm install -n cumulo-system --create-namespace), not %q: the agents' heartbeat Leases and the node-restriction policy name it" .Release.Namespace) -}}
{{- end -}}
{{- .Release.Namespace -}}
{{- end -}}

{{- define "cumulo.labels" -}}
app.kubernetes.io/name: cumulo
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cumulo
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "cumulo.selector" -}}
app.kubernetes.io/name: cumulo
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cumulo.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Where the webhook's certificate comes from: cert-manager or helm (values.webhook.certificate.source). */}}
{{- define "cumulo.webhook.certSource" -}}
{{- $source := .Values.webhook.certificate.source -}}
{{- if eq $source "auto" -}}
{{- if .Capabilities.APIVersions.Has "cert-manager.io/v1" -}}cert-manager{{- else -}}helm{{- end -}}
{{- else -}}
{{- $source -}}
{{- end -}}
{{- end -}}

{{- define "cumulo.webhook.serviceName" -}}cumulo-webhook{{- end -}}
{{- define "cumulo.webhook.secretName" -}}cumulo-webhook-tls{{- end -}}

{{/*
The chart-generated webhook certificate, as JSON {ca, crt, key} (base64 PEM). Generated once per render and
cached in .Values so that the Secret and the webhook configuration's caBundle agree; an existing Secret made by
an earlier release is kept (a `helm upgrade` does not rotate it; delete the Secret to rotate).
*/}}
{{- define "cumulo.webhook.generatedTLS" -}}
{{- if not (hasKey .Values "__webhookTLS") -}}
{{- $secret := lookup "v1" "Secret" (include "cumulo.namespace" .) (include "cumulo.webhook.secretName" .) -}}
{{- if and $secret (index ($secret.data | default dict) "ca.crt") -}}
{{- $_ := set .Values "__webhookTLS" (dict "ca" (index $secret.data "ca.crt") "crt" (index $secret.data "tls.crt") "key" (index $secret.data "tls.key")) -}}
{{- else -}}
{{- $service := include "cumulo.webhook.serviceName" . -}}
{{- $namespace := include "cumulo.namespace" . -}}
{{- $days := int .Values.webhook.certificate.validityDays -}}
{{- $ca := genCA "cumulo-webhook-ca" $days -}}
{{- $names := list $service (printf "%s.%s" $service $namespace) (printf "%s.%s.svc" $service $namespace) (printf "%s.%s.svc.cluster.local" $service $namespace) -}}
{{- $cert := genSignedCert (printf "%s.%s.svc" $service $namespace) nil $names $days $ca -}}
{{- $_ := set .Values "__webhookTLS" (dict "ca" ($ca.Cert | b64enc) "crt" ($cert.Cert | b64enc) "key" ($cert.Key | b64enc)) -}}
{{- end -}}
{{- end -}}
{{- toJson (index .Values "__webhookTLS") -}}
{{- end -}}

{{/*
What a ValidatingWebhookConfiguration of the chart (webhook.yaml) needs to trust the webhook:
- "cumulo.webhook.annotations": cert-manager's CA injection annotation (empty with the helm source);
- "cumulo.webhook.caBundle": the base64 CA bundle (empty with cert-manager, which injects it);
- "cumulo.webhook.clientConfig": the whole clientConfig (service, path /cumulo, caBundle when helm makes it).
*/}}
{{- define "cumulo.webhook.annotations" -}}
{{- if eq (include "cumulo.webhook.certSource" .) "cert-manager" -}}
cert-manager.io/inject-ca-from: {{ include "cumulo.namespace" . }}/cumulo-webhook
{{- end -}}
{{- end -}}

{{- define "cumulo.webhook.caBundle" -}}
{{- if eq (include "cumulo.webhook.certSource" .) "helm" -}}
{{- (include "cumulo.webhook.generatedTLS" . | fromJson).ca -}}
{{- end -}}
{{- end -}}

{{- define "cumulo.webhook.clientConfig" -}}
service:
  name: {{ include "cumulo.webhook.serviceName" . }}
  namespace: {{ include "cumulo.namespace" . }}
  path: /cumulo
  port: 443
{{- with include "cumulo.webhook.caBundle" . }}
caBundle: {{ . }}
{{- end }}
{{- end -}}
