"""The tap client: find a resource's pods in the local mesh, open ``Tap/Observe`` on each pod's proxy
(port 4190, mesh mTLS) and render the events as Linkerd's ``viz tap`` does.

Client identity: the CLI signs itself a short-lived certificate (one hour) for Linkerd's viz tap
identity, ``tap.linkerd-viz.serviceaccount.identity.<control-plane ns>.<trust domain>``, with the
local mesh's issuer (its key is in the state directory the CLI already reads): the local trust root,
not the identity service, because the identity service only certifies registered workloads with
their bootstrap tokens and the tap client is not a workload. Proxies authorize exactly that identity
by default (``--tap-authorized-identities``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.api.gen import http_types_pb2, net_pb2, tap_pb2

TAP_PORT = 4190
TAP_SERVICE_ACCOUNT = "tap"
TAP_NAMESPACE = "linkerd-viz"
OBSERVE = "/io.linkerd.proxy.tap.Tap/Observe"
CERT_LIFETIME = dt.timedelta(hours=1)

# Go's codes.Code String(): what Linkerd prints as grpc-status.
GRPC_CODE_NAMES = ("OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
                   "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted",
                   "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated")
KINDS = {"deploy": "deployment", "deployment": "deployment", "deployments": "deployment",
         "po": "pod", "pod": "pod", "pods": "pod", "svc": "service", "service": "service", "services": "service",
         "ns": "namespace", "namespace": "namespace"}


class TapError(Exception):
    """A tap could not start or broke; the message says why in one line."""


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    workload: str
    ip: str
    identity: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Mesh:
    """What the tap client reads of a local mesh: its pods, Services and trust material."""

    pods: tuple[Pod, ...]
    services: Mapping[str, str]  # "ns/name" -> virtual IP
    anchors_pem: bytes
    issuer_cert_pem: bytes
    issuer_key_pem: bytes
    controller_namespace: str
    trust_domain: str

    @classmethod
    def load(cls, state_dir: str) -> Mesh:
        from tether.platform.local.layout import Layout, LayoutError

        layout = Layout(state_dir)
        try:
            s = layout.read_settings()
        except LayoutError as e:
            raise TapError(str(e)) from None
        if layout.supervisor_pid() is None:
            raise TapError(f"the local mesh in {layout.root} is not running (tether up)")
        pods = tuple(Pod(p["name"], p["namespace"], p["workload"], p["ip"], p["identity"])
                     for p in layout.read_status().get("pods", [])
                     if p.get("meshed") and p.get("phase") == "Running")
        try:
            services = json.loads(layout.services_path.read_text())
        except (OSError, ValueError):
            services = {}
        try:
            anchors = Path(s.trust_anchors).read_bytes()
            cert = Path(s.issuer_certificate).read_bytes()
            key = Path(s.issuer_key).read_bytes()
        except OSError as e:
            raise TapError(f"cannot read the mesh's trust material: {e}") from None
        return cls(pods, services, anchors, cert, key, s.controller_namespace, s.trust_domain)

    def select(self, resource: str, namespace: str) -> list[Pod]:
        """The running meshed pods of ``deploy/NAME``, ``po/NAME``, ``svc/NAME`` or ``ns/NAME``."""
        kind, name = parse_resource(resource)
        if kind == "namespace":
            return [p for p in self.pods if p.namespace == name]
        if kind == "pod":
            return [p for p in self.pods if p.namespace == namespace and p.name == name]
        # A local Service selects the workload of the same name (tether run NAME --port creates both).
        return [p for p in self.pods if p.namespace == namespace and p.workload == name]

    def addresses(self, resource: str, namespace: str) -> list[str]:
        """The IPs requests to ``resource`` go to: its pods', and its Service's virtual IP."""
        kind, name = parse_resource(resource)
        ips = [p.ip for p in self.select(resource, namespace)]
        if kind in ("deployment", "service"):
            vip = self.services.get(f"{namespace}/{name}")
            if vip:
                ips.append(vip)
        if kind == "namespace":
            ips += [v for k, v in self.services.items() if k.split("/", 1)[0] == name]
        return ips

    def owner_of(self, ip: str) -> dict[str, str]:
        """Resource labels of an address (for -o wide): the pod or Service it belongs to."""
        for p in self.pods:
            if p.ip == ip:
                return {"namespace": p.namespace, "deployment": p.workload, "pod": p.name}
        for k, v in self.services.items():
            if v == ip:
                ns, svc = k.split("/", 1)
                return {"namespace": ns, "service": svc}
        return {}

    def tap_identity(self) -> str:
        return (f"{TAP_SERVICE_ACCOUNT}.{TAP_NAMESPACE}.serviceaccount.identity."
                f"{self.controller_namespace}.{self.trust_domain}")


def parse_resource(resource: str) -> tuple[str, str]:
    kind, sep, name = resource.partition("/")
    if not sep or not name:
        raise TapError(f"{resource!r} is not a resource like deploy/NAME, po/NAME, svc/NAME or ns/NAME")
    full = KINDS.get(kind.lower())
    if full is None:
        raise TapError(f"{resource!r}: unknown resource type {kind!r} (deploy, po, svc, ns)")
    return full, name


# -- the request ---------------------------------------------------------------------------------------


def observe_request(*, path: str | None = None, method: str | None = None, authority: str | None = None,
                    scheme: str | None = None, to_ips: Iterable[str] | None = None, max_rps: float = 0.0,
                    limit: int = 0, extract_headers: bool = False) -> tap_pb2.ObserveRequest:
    """An ObserveRequest matching every filter given (``to_ips``: destination is any of them)."""
    M = tap_pb2.ObserveRequest.Match
    parts: list[tap_pb2.ObserveRequest.Match] = []
    if path:
        parts.append(M(http=M.Http(path=M.Http.StringMatch(prefix=path))))
    if method:
        m = method.upper()
        names = dict(http_types_pb2.HttpMethod.Registered.items())
        hm = http_types_pb2.HttpMethod(registered=names[m]) if m in names else \
            http_types_pb2.HttpMethod(unregistered=m)
        parts.append(M(http=M.Http(method=hm)))
    if authority:
        parts.append(M(http=M.Http(authority=M.Http.StringMatch(exact=authority))))
    if scheme:
        s = scheme.lower()
        reg = http_types_pb2.Scheme.HTTPS if s == "https" else http_types_pb2.Scheme.HTTP
        sm = http_types_pb2.Scheme(registered=reg) if s in ("http", "https") else \
            http_types_pb2.Scheme(unregistered=scheme)
        parts.append(M(http=M.Http(scheme=sm)))
    if to_ips is not None:
        nets = []
        for ip in to_ips:
            a = ipaddress.ip_address(ip)
            addr = net_pb2.IPAddress(ipv4=int(a)) if a.version == 4 else net_pb2.IPAddress(
                ipv6=net_pb2.IPv6(first=int(a) >> 64, last=int(a) & (2**64 - 1)))
            nets.append(M(destination=M.Tcp(netmask=M.Tcp.Netmask(ip=addr, mask=32 if a.version == 4 else 128))))
        parts.append(M(any=M.Seq(matches=nets)))  # an empty "any" matches nothing: no such destination
    req = tap_pb2.ObserveRequest(limit=limit, max_rps=max_rps)
    if parts:
        req.match.CopyFrom(M(all=M.Seq(matches=parts)))
    if extract_headers:
        req.extract.CopyFrom(tap_pb2.ObserveRequest.Extract(
            http=tap_pb2.ObserveRequest.Extract.Http(headers=tap_pb2.ObserveRequest.Extract.Http.Headers())))
    return req


# -- the client identity -----------------------------------------------------------------------------------


class ClientCredentials:
    """A TLS client context holding a fresh certificate for ``identity``, signed by the mesh's issuer."""

    def __init__(self, mesh: Mesh, identity: str | None = None) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from tether.core.identity.certs import CertificateError, load_issuer
        from tether.core.identity.csr import build_csr, generate_key
        from tether.core.identity.issuance import IssuancePolicy, issue_leaf
        from tether.core.identity.names import IdentityNameError, parse_identity_name

        self.identity = identity or mesh.tap_identity()
        try:
            who = parse_identity_name(self.identity)
            issuer = load_issuer(mesh.issuer_cert_pem, mesh.issuer_key_pem, "issuer certificate", "issuer key")
            key = generate_key()
            csr = x509.load_der_x509_csr(build_csr(key, who))
            leaf = issue_leaf(issuer, csr, who, dt.datetime.now(dt.UTC), IssuancePolicy(lifetime=CERT_LIFETIME))
        except (IdentityNameError, CertificateError, ValueError) as e:
            raise TapError(f"cannot make a client certificate for {self.identity}: {e}") from None
        chain = b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM)
                         for d in (leaf.leaf_der, *leaf.intermediates_der))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cadata=mesh.anchors_pem.decode())
        with tempfile.TemporaryDirectory(prefix="tether-tap-") as d:
            cert_path, key_path = os.path.join(d, "tls.crt"), os.path.join(d, "tls.key")
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key_pem)
            Path(cert_path).write_bytes(chain)
            ctx.load_cert_chain(cert_path, key_path)
        self.context = ctx


# -- the streams ---------------------------------------------------------------------------------------------


async def observe(pod: Pod, creds: ClientCredentials, request: tap_pb2.ObserveRequest,
                  port: int = TAP_PORT) -> AsyncIterator[tap_pb2.TapEvent]:
    """The events of one pod's proxy, until the stream ends; a refused or broken tap is a TapError."""
    from tether.proxy.grpc_client import GrpcChannel, GrpcError

    channel = GrpcChannel(f"{pod.ip}:{port}", ssl_context=creds.context, server_hostname=pod.identity,
                          connect_timeout=5.0)
    try:
        async for msg in channel.server_stream(OBSERVE, request.SerializeToString()):
            ev = tap_pb2.TapEvent()
            ev.ParseFromString(msg)
            yield ev
    except GrpcError as e:
        raise TapError(f"tap of pod {pod.namespace}/{pod.name} ({pod.ip}:{port}): {e}") from None
    finally:
        channel.close()


async def probe(pod: Pod, creds: ClientCredentials, port: int = TAP_PORT, timeout: float = 5.0) -> None:
    """Whether ``pod``'s proxy accepts a tap from ``creds`` (TapError saying why not). The stream is
    opened with a match no request meets, and closed as soon as the proxy accepted it."""
    from tether.proxy.grpc_client import GrpcChannel, GrpcError

    channel = GrpcChannel(f"{pod.ip}:{port}", ssl_context=creds.context, server_hostname=pod.identity,
                          connect_timeout=timeout)
    request = observe_request(path="/tether-viz-check-matches-nothing")
    try:
        async with asyncio.timeout(timeout):
            await channel.probe_stream(OBSERVE, request.SerializeToString())
    except TimeoutError:
        raise TapError(f"tap of pod {pod.namespace}/{pod.name} ({pod.ip}:{port}): no answer in {timeout:g}s") from None
    except GrpcError as e:
        raise TapError(f"tap of pod {pod.namespace}/{pod.name} ({pod.ip}:{port}): {e}") from None
    finally:
        channel.close()


async def tap_pods(pods: list[Pod], creds: ClientCredentials, request: tap_pb2.ObserveRequest,
                   on_event: Callable[[Pod, tap_pb2.TapEvent], None], duration: float | None = None) -> None:
    """Tap every pod at once, calling ``on_event`` as events arrive, for ``duration`` seconds (None: until
    every stream ends). The first pod whose tap fails ends the whole tap with its error."""

    async def one(pod: Pod) -> None:
        async for ev in observe(pod, creds, request):
            on_event(pod, ev)

    try:
        async with asyncio.timeout(duration):
            async with asyncio.TaskGroup() as tg:
                for p in pods:
                    tg.create_task(one(p))
    except TimeoutError:
        return
    except BaseExceptionGroup as eg:
        first = eg.exceptions[0]
        raise first if isinstance(first, TapError) else TapError(str(first)) from None


class StatusFilter:
    """Passes on the events of requests answered with ``status``: a request's event is held until its
    response head arrives (bounded: the oldest held requests are forgotten beyond ``max_held``)."""

    def __init__(self, status: int, show: Callable[[Any, tap_pb2.TapEvent], None], max_held: int = 10_000) -> None:
        self.status = status
        self.show = show
        self.max_held = max_held
        self.held: dict[tuple[int, int], tap_pb2.TapEvent] = {}
        self.shown: set[tuple[int, int]] = set()

    def __call__(self, mesh: Any, ev: tap_pb2.TapEvent) -> None:
        which = ev.http.WhichOneof("event")
        if which is None:
            return
        sid = getattr(ev.http, which).id
        key = (sid.base, sid.stream)
        if which == "request_init":
            if len(self.held) >= self.max_held:
                self.held.pop(next(iter(self.held)))
            self.held[key] = ev
        elif which == "response_init":
            req = self.held.pop(key, None)
            if ev.http.response_init.http_status == self.status:
                if req is not None:
                    self.show(mesh, req)
                self.show(mesh, ev)
                self.shown.add(key)
        elif key in self.shown:
            self.shown.discard(key)
            self.show(mesh, ev)
        else:
            self.held.pop(key, None)


# -- rendering (Linkerd's viz tap lines) --------------------------------------------------------------------------


def _ip(a: net_pb2.IPAddress) -> str:
    if a.WhichOneof("ip") == "ipv6":
        return str(ipaddress.IPv6Address((a.ipv6.first << 64) | a.ipv6.last))
    return str(ipaddress.IPv4Address(a.ipv4))


def addr_str(a: net_pb2.TcpAddress) -> str:
    ip = _ip(a.ip)
    return f"[{ip}]:{a.port}" if ":" in ip else f"{ip}:{a.port}"


def _micros(d: Any) -> int:
    return int(d.seconds * 1_000_000 + d.nanos // 1000)


def method_name(m: http_types_pb2.HttpMethod) -> str:
    if m.WhichOneof("type") == "unregistered":
        return m.unregistered
    return http_types_pb2.HttpMethod.Registered.Name(m.registered)


def scheme_name(s: http_types_pb2.Scheme) -> str:
    if s.WhichOneof("type") == "unregistered":
        return s.unregistered
    return http_types_pb2.Scheme.Registered.Name(s.registered)


def render_line(ev: tap_pb2.TapEvent) -> str:
    """One event as Linkerd's ``viz tap`` prints it (req / rsp / end)."""
    if ev.proxy_direction == tap_pb2.TapEvent.INBOUND:
        proxy, tls = "in ", ev.source_meta.labels.get("tls", "")
    elif ev.proxy_direction == tap_pb2.TapEvent.OUTBOUND:
        proxy, tls = "out", ev.destination_meta.labels.get("tls", "")
    else:
        proxy, tls = "???", ""
    flow = f"proxy={proxy} src={addr_str(ev.source)} dst={addr_str(ev.destination)} tls={tls}"
    h = ev.http
    which = h.WhichOneof("event")
    if which == "request_init":
        r = h.request_init
        return (f"req id={r.id.base}:{r.id.stream} {flow} :method={method_name(r.method)} "
                f":authority={r.authority} :path={r.path}")
    if which == "response_init":
        s = h.response_init
        return (f"rsp id={s.id.base}:{s.id.stream} {flow} :status={s.http_status} "
                f"latency={_micros(s.since_request_init)}µs")
    if which == "response_end":
        e = h.response_end
        head = f"end id={e.id.base}:{e.id.stream} {flow}"
        tail = f"duration={_micros(e.since_response_init)}µs response-length={e.response_bytes}B"
        eos = e.eos.WhichOneof("end") if e.HasField("eos") else None
        if eos == "grpc_status_code":
            code = e.eos.grpc_status_code
            name = GRPC_CODE_NAMES[code] if code < len(GRPC_CODE_NAMES) else f"Code({code})"
            return f"{head} grpc-status={name} {tail}"
        if eos == "reset_error_code":
            return f"{head} reset-error={e.eos.reset_error_code} {tail}"
        return f"{head} {tail}"
    return f"unknown {flow}"


def render_wide(ev: tap_pb2.TapEvent, mesh: Mesh) -> str:
    """The line, then the source's and destination's resources (src_deployment=...), as ``-o wide``."""
    out = [render_line(ev)]
    for side, a in (("src", ev.source), ("dst", ev.destination)):
        out += sorted(f"{side}_{k}={v}" for k, v in mesh.owner_of(_ip(a.ip)).items())
    out += [f"rt_{k}={v}" for k, v in sorted(ev.route_meta.labels.items())]
    return " ".join(out)


def _headers(hs: http_types_pb2.Headers) -> list[dict[str, str]]:
    out = []
    for h in hs.headers:
        try:
            out.append({"name": h.name, "valueStr": h.value.decode("utf-8")})
        except UnicodeDecodeError:
            import base64

            out.append({"name": h.name, "valueBin": base64.b64encode(h.value).decode()})
    return out


def event_json(ev: tap_pb2.TapEvent, mesh: Mesh | None = None) -> dict[str, Any]:
    """One event as a JSON object: Linkerd's display shape (``requestInitEvent`` ...), and the same event
    under ``requestInit`` / ``responseInit`` / ``responseEnd`` with an ``http`` member (the seeds' jq)."""

    def peer(a: net_pb2.TcpAddress, labels: Mapping[str, str]) -> dict[str, Any]:
        meta = dict(labels)
        if mesh is not None:
            meta.update(mesh.owner_of(_ip(a.ip)))
        return {"ip": _ip(a.ip), "port": a.port, "metadata": meta}

    doc: dict[str, Any] = {
        "source": peer(ev.source, ev.source_meta.labels),
        "destination": peer(ev.destination, ev.destination_meta.labels),
        "routeMeta": dict(ev.route_meta.labels) or None,
        "proxyDirection": tap_pb2.TapEvent.ProxyDirection.Name(ev.proxy_direction),
    }
    h = ev.http
    which = h.WhichOneof("event")
    body: dict[str, Any]
    if which == "request_init":
        r = h.request_init
        body = {"id": {"base": r.id.base, "stream": r.id.stream}, "method": method_name(r.method),
                "scheme": scheme_name(r.scheme), "authority": r.authority, "path": r.path,
                "headers": _headers(r.headers)}
        doc["requestInitEvent"] = body
        doc["requestInit"] = {"id": body["id"], "http": {k: v for k, v in body.items() if k != "id"}}
    elif which == "response_init":
        s = h.response_init
        body = {"id": {"base": s.id.base, "stream": s.id.stream},
                "sinceRequestInit": {"seconds": s.since_request_init.seconds, "nanos": s.since_request_init.nanos},
                "httpStatus": s.http_status, "headers": _headers(s.headers)}
        doc["responseInitEvent"] = body
        doc["responseInit"] = {"id": body["id"], "http": {k: v for k, v in body.items() if k != "id"}}
    elif which == "response_end":
        e = h.response_end
        body = {"id": {"base": e.id.base, "stream": e.id.stream},
                "sinceRequestInit": {"seconds": e.since_request_init.seconds, "nanos": e.since_request_init.nanos},
                "sinceResponseInit": {"seconds": e.since_response_init.seconds,
                                      "nanos": e.since_response_init.nanos},
                "responseBytes": e.response_bytes, "trailers": _headers(e.trailers),
                "grpcStatusCode": e.eos.grpc_status_code, "resetErrorCode": e.eos.reset_error_code}
        doc["responseEndEvent"] = body
        doc["responseEnd"] = {"id": body["id"], "http": {k: v for k, v in body.items() if k != "id"}}
    return doc
