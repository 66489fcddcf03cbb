{{/*
The proxy sidecar of the control-plane pods. tether's injector builds the same containers in Python
(tether.core.inject.pod); tests/kube/test_charts.py renders both and compares them field by field.
*/}}

{{- define "tether.version" -}}
{{- .Chart.AppVersion -}}
{{- end }}

{{- define "tether.trustDomain" -}}
{{- .Values.identityTrustDomain | default .Values.clusterDomain -}}
{{- end }}

{{/* Linkerd-shaped resources ({cpu: {request, limit}, ...}) as a container's resources, in JSON. */}}
{{- define "tether.resources" -}}
{{- $r := . | default dict -}}
{{- $req := dict -}}
{{- $lim := dict -}}
{{- range $k := list "cpu" "memory" "ephemeral-storage" -}}
{{- with (get $r $k) -}}
{{- if .request }}{{- $_ := set $req $k (toString .request) -}}{{- end -}}
{{- if .limit }}{{- $_ := set $lim $k (toString .limit) -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- $out := dict -}}
{{- if $req }}{{- $_ := set $out "requests" $req -}}{{- end -}}
{{- if $lim }}{{- $_ := set $out "limits" $lim -}}{{- end -}}
{{- toJson $out -}}
{{- end }}

{{- define "tether.labels" -}}
linkerd.io/control-plane-component: {{ .component }}
linkerd.io/control-plane-ns: {{ .ns }}
{{- end }}

{{- define "tether.svc" -}}
{{ .name }}.{{ .root.Release.Namespace }}.svc.{{ .root.Values.clusterDomain }}:{{ .port }}
{{- end }}

{{/* The TLS identity of a control-plane service: .root, .sa (its service account). */}}
{{- define "tether.controlIdentity" -}}
{{ .sa }}.{{ .root.Release.Namespace }}.serviceaccount.identity.{{ .root.Release.Namespace }}.{{ include "tether.trustDomain" .root }}
{{- end }}

{{- define "tether.proxy" -}}
{{- $v := .Values -}}
{{- $p := .Values.proxy -}}
{{- $admin := $p.ports.admin -}}
{{- $identitySvc := include "tether.controlIdentity" (dict "root" . "sa" "linkerd-identity") -}}
{{- $destinationSvc := include "tether.controlIdentity" (dict "root" . "sa" "linkerd-destination") -}}
name: linkerd-proxy
image: {{ $p.image.name }}:{{ $p.image.version | default (include "tether.version" .) }}
imagePullPolicy: {{ $p.image.pullPolicy | default $v.imagePullPolicy }}
command: [python, -OO, -X, no_debug_ranges, -m, tether]
args: [proxy]
env:
- name: _pod_name
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: _pod_ns
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: _pod_nodeName
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
- name: _pod_sa
  valueFrom: {fieldRef: {fieldPath: spec.serviceAccountName}}
- {name: TETHER_PROXY_LOG_LEVEL, value: {{ $p.logLevel | quote }}}
- {name: TETHER_PROXY_LOG_FORMAT, value: {{ $p.logFormat | quote }}}
- {name: TETHER_PROXY_INBOUND_ADDR, value: "0.0.0.0:{{ $p.ports.inbound }}"}
- {name: TETHER_PROXY_OUTBOUND_ADDR, value: "127.0.0.1:{{ $p.ports.outbound }}"}
- {name: TETHER_PROXY_ADMIN_ADDR, value: "0.0.0.0:{{ $admin }}"}
{{- with $p.opaquePorts }}
- {name: TETHER_PROXY_OPAQUE_PORTS, value: {{ toString . | quote }}}
{{- end }}
{{- with $p.outboundConnectTimeout }}
- {name: TETHER_PROXY_OUTBOUND_CONNECT_TIMEOUT, value: {{ toString . | quote }}}
{{- end }}
{{- with $p.inboundConnectTimeout }}
- {name: TETHER_PROXY_INBOUND_CONNECT_TIMEOUT, value: {{ toString . | quote }}}
{{- end }}
{{- with $p.outboundDiscoveryCacheUnusedTimeout }}
- {name: TETHER_PROXY_CACHE_MAX_IDLE_AGE, value: {{ toString . | quote }}}
{{- end }}
{{- with $p.shutdownGracePeriod }}
- {name: TETHER_PROXY_SHUTDOWN_GRACE_PERIOD, value: {{ toString . | quote }}}
{{- end }}
- {name: TETHER_PROXY_ENABLE_ADMIN_SHUTDOWN, value: {{ ternary "true" "false" $p.enableShutdownEndpoint | quote }}}
{{- with $p.defaultInboundPolicy }}
- {name: TETHER_PROXY_DEFAULT_INBOUND_POLICY, value: {{ . | quote }}}
{{- end }}
{{- with $v.clusterNetworks }}
- {name: TETHER_PROXY_CLUSTER_NETWORKS, value: {{ . | quote }}}
{{- end }}
- {name: TETHER_PROXY_DESTINATION_ADDRS, value: {{ include "tether.svc" (dict "root" . "name" "linkerd-dst" "port" 8086) | quote }}}
- {name: TETHER_PROXY_DESTINATION_SVC_NAME, value: {{ $destinationSvc | quote }}}
- name: TETHER_PROXY_DESTINATION_CONTEXT
  value: '{"ns":"$(_pod_ns)","nodeName":"$(_pod_nodeName)","pod":"$(_pod_name)"}'
- {name: TETHER_PROXY_POLICY_ADDRS, value: {{ include "tether.svc" (dict "root" . "name" "linkerd-policy" "port" 8090) | quote }}}
- {name: TETHER_PROXY_POLICY_SVC_NAME, value: {{ $destinationSvc | quote }}}
- name: TETHER_PROXY_POLICY_WORKLOAD
  value: '{"ns":"$(_pod_ns)","pod":"$(_pod_name)"}'
- name: TETHER_PROXY_IDENTITY_NAME
  value: "$(_pod_sa).$(_pod_ns).serviceaccount.identity.{{ .Release.Namespace }}.{{ include "tether.trustDomain" . }}"
- {name: TETHER_PROXY_IDENTITY_ADDRS, value: {{ include "tether.svc" (dict "root" . "name" "linkerd-identity" "port" 8080) | quote }}}
- {name: TETHER_PROXY_IDENTITY_SVC_NAME, value: {{ $identitySvc | quote }}}
- {name: TETHER_PROXY_IDENTITY_TOKEN_PATH, value: /var/run/secrets/tokens/linkerd-identity-token}
- {name: TETHER_PROXY_IDENTITY_TRUST_ANCHORS, value: /var/run/linkerd/identity/trust-anchors/ca-bundle.crt}
- {name: LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS, value: {{ .Values.identityTrustAnchorsPEM | quote }}}
- {name: LINKERD2_PROXY_IDENTITY_SVC_NAME, value: {{ $identitySvc | quote }}}
- {name: LINKERD2_PROXY_DESTINATION_SVC_NAME, value: {{ $destinationSvc | quote }}}
- {name: LINKERD2_PROXY_POLICY_SVC_NAME, value: {{ $destinationSvc | quote }}}
# The interpreter's locale: C, so no locale file is mapped (tether.core.sidecar.LOCALE_ENV).
- {name: LC_ALL, value: C}
- {name: PYTHONCOERCECLOCALE, value: "0"}
ports:
- {name: linkerd-proxy, containerPort: {{ $p.ports.inbound }}}
- {name: linkerd-admin, containerPort: {{ $admin }}}
readinessProbe:
  httpGet: {path: /ready, port: {{ $admin }}}
  initialDelaySeconds: 2
  timeoutSeconds: 1
livenessProbe:
  httpGet: {path: /live, port: {{ $admin }}}
  initialDelaySeconds: 10
  timeoutSeconds: 1
resources: {{ include "tether.resources" $p.resources }}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  runAsUser: {{ $p.uid }}
  seccompProfile: {type: RuntimeDefault}
  {{- if ge (int $p.gid) 0 }}
  runAsGroup: {{ $p.gid }}
  {{- end }}
terminationMessagePolicy: FallbackToLogsOnError
volumeMounts:
- {name: linkerd-identity-token, mountPath: /var/run/secrets/tokens, readOnly: true}
- {name: linkerd-trust-anchors, mountPath: /var/run/linkerd/identity/trust-anchors, readOnly: true}
{{- if $p.nativeSidecar }}
restartPolicy: Always
startupProbe:
  httpGet: {path: /ready, port: {{ $admin }}}
  periodSeconds: 1
  failureThreshold: 120
{{- end }}
{{- if or (and $p.await (not $p.nativeSidecar)) (gt (int $p.waitBeforeExitSeconds) 0) }}
lifecycle:
  {{- if and $p.await (not $p.nativeSidecar) }}
  postStart:
    exec:
      command: [tether, proxy-await, --admin-port, {{ $admin | quote }}, --timeout, 2m]
  {{- end }}
  {{- if gt (int $p.waitBeforeExitSeconds) 0 }}
  preStop:
    exec:
      command: [sleep, {{ $p.waitBeforeExitSeconds | quote }}]
  {{- end }}
{{- end }}
{{- end }}

{{/* proxy-init: .root, .skipInbound and .skipOutbound (the pod's own ports to leave alone, "" for none) */}}
{{- define "tether.proxy-init" -}}
{{- $v := .root.Values -}}
{{- $i := $v.proxyInit -}}
{{- $p := $v.proxy -}}
{{- $in := list (toString $p.ports.control) (toString $p.ports.admin) -}}
{{- range (splitList "," (printf "%s,%s" (toString $i.ignoreInboundPorts) .skipInbound)) }}{{ if trim . }}{{ $in = append $in (trim .) }}{{ end }}{{ end -}}
{{- $out := list -}}
{{- range (splitList "," (printf "%s,%s" (toString $i.ignoreOutboundPorts) .skipOutbound)) }}{{ if trim . }}{{ $out = append $out (trim .) }}{{ end }}{{ end -}}
{{- $nets := list -}}
{{- range (splitList "," (toString $i.skipSubnets)) }}{{ if trim . }}{{ $nets = append $nets (trim .) }}{{ end }}{{ end -}}
name: linkerd-init
image: {{ $i.image.name }}:{{ $i.image.version | default (include "tether.version" .root) }}
imagePullPolicy: {{ $i.image.pullPolicy | default $v.imagePullPolicy }}
command: [tether-proxy-init]
args:
- --incoming-proxy-port
- {{ $p.ports.inbound | quote }}
- --outgoing-proxy-port
- {{ $p.ports.outbound | quote }}
- --proxy-uid
- {{ $p.uid | quote }}
- --inbound-ports-to-ignore
- {{ join "," $in | quote }}
{{- if $out }}
- --outbound-ports-to-ignore
- {{ join "," $out | quote }}
{{- end }}
{{- if $nets }}
- --subnets-to-ignore
- {{ join "," $nets | quote }}
{{- end }}
- --iptables-mode
- {{ $i.iptablesMode }}
resources: {{ include "tether.resources" ($i.resources | default $p.resources) }}
securityContext:
  allowPrivilegeEscalation: false
  capabilities:
    add: [NET_ADMIN, NET_RAW]
  privileged: false
  readOnlyRootFilesystem: true
  runAsNonRoot: {{ not $i.runAsRoot }}
  runAsUser: {{ ternary 0 $i.runAsUser $i.runAsRoot }}
  seccompProfile: {type: RuntimeDefault}
terminationMessagePolicy: FallbackToLogsOnError
volumeMounts:
- {name: linkerd-proxy-init-xtables-lock, mountPath: /run}
{{- end }}

{{- define "tether.proxy-volumes" -}}
- name: linkerd-identity-token
  projected:
    sources:
    - serviceAccountToken: {audience: identity.l5d.io, expirationSeconds: 86400, path: linkerd-identity-token}
- name: linkerd-trust-anchors
  downwardAPI:
    items:
    - path: ca-bundle.crt
      fieldRef: {fieldPath: "metadata.annotations['tether.io/trust-anchors']"}
- name: linkerd-proxy-init-xtables-lock
  emptyDir: {}
{{- end }}

{{- define "tether.proxy-annotations" -}}
linkerd.io/created-by: tether/helm {{ include "tether.version" . }}
linkerd.io/identity-mode: default
linkerd.io/proxy-version: {{ .Values.proxy.image.version | default (include "tether.version" .) | quote }}
linkerd.io/trust-root-sha256: {{ sha256sum .Values.identityTrustAnchorsPEM }}
tether.io/trust-anchors: {{ .Values.identityTrustAnchorsPEM | quote }}
{{- end }}

{{/* A control-plane Deployment: .root, .name, .component, .container (YAML), .volumes (YAML or ""),
.skipInbound and .skipOutbound (ports its proxy-init leaves alone, "" for none) */}}
{{- define "tether.deployment" -}}
{{- $v := .root.Values -}}
{{- $ns := .root.Release.Namespace -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .name }}
  namespace: {{ $ns }}
  labels:
    {{- include "tether.labels" (dict "component" .component "ns" $ns) | nindent 4 }}
spec:
  replicas: {{ $v.controllerReplicas }}
  revisionHistoryLimit: 10
  selector:
    matchLabels:
      {{- include "tether.labels" (dict "component" .component "ns" $ns) | nindent 6 }}
  strategy:
    {{- toYaml $v.deploymentStrategy | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "tether.labels" (dict "component" .component "ns" $ns) | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- include "tether.proxy-annotations" .root | nindent 8 }}
    spec:
      serviceAccountName: {{ .name }}
      automountServiceAccountToken: true
      nodeSelector: {{ toJson ($v.nodeSelector | default dict) }}
      {{- with $v.tolerations }}
      tolerations: {{ toJson . }}
      {{- end }}
      {{- with $v.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with $v.imagePullSecrets }}
      imagePullSecrets: {{ toJson . }}
      {{- end }}
      {{- if $v.enablePodAntiAffinity }}
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - labelSelector:
              matchLabels: {linkerd.io/control-plane-component: {{ .component }}}
            topologyKey: kubernetes.io/hostname
          preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 100
            podAffinityTerm:
              labelSelector:
                matchLabels: {linkerd.io/control-plane-component: {{ .component }}}
              topologyKey: topology.kubernetes.io/zone
      {{- end }}
      initContainers:
      - {{- include "tether.proxy-init" (dict "root" .root "skipInbound" .skipInbound "skipOutbound" .skipOutbound) | nindent 8 }}
      {{- if $v.proxy.nativeSidecar }}
      - {{- include "tether.proxy" .root | nindent 8 }}
      {{- end }}
      containers:
      {{- if not $v.proxy.nativeSidecar }}
      - {{- include "tether.proxy" .root | nindent 8 }}
      {{- end }}
      - {{- .container | nindent 8 }}
      volumes:
      {{- with .volumes }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- include "tether.proxy-volumes" .root | nindent 6 }}
{{- end }}

{{/* A controller container: .root, .name, .args (list), .grpc, .admin, .resources, .mounts (YAML or "") */}}
{{- define "tether.controller" -}}
{{- $v := .root.Values -}}
name: {{ .name }}
image: {{ $v.controllerImage }}:{{ $v.controllerImageVersion | default (include "tether.version" .root) }}
imagePullPolicy: {{ $v.imagePullPolicy }}
args: {{ toJson .args }}
ports:
- {name: {{ .portName }}, containerPort: {{ .grpc }}}
- {name: admin-http, containerPort: {{ .admin }}}
readinessProbe:
  httpGet: {path: /ready, port: {{ .admin }}}
  failureThreshold: 7
livenessProbe:
  httpGet: {path: /ping, port: {{ .admin }}}
  initialDelaySeconds: 10
resources: {{ include "tether.resources" (.resources | default $v.controllerResources) }}
securityContext:
  allowPrivilegeEscalation: false
  capabilities: {drop: [ALL]}
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  runAsUser: 2103
  seccompProfile: {type: RuntimeDefault}
{{- with .mounts }}
volumeMounts:
{{- . | nindent 0 }}
{{- end }}
{{- end }}
