"""linkerd2-proxy-api address messages read into the proxy's types (shared by the destination and
policy clients)."""

from __future__ import annotations

import ipaddress

from tether.api.gen import destination_lite, http_types_lite, net_lite
from tether.core.discovery.endpoints import Addr, Endpoint


def tcp_addr(a: net_lite.TcpAddress) -> Addr:
    ip = a.ip
    if ip.WhichOneof("ip") == "ipv6":
        n = (ip.ipv6.first << 64) | ip.ipv6.last
        return str(ipaddress.IPv6Address(n)), a.port
    return str(ipaddress.IPv4Address(ip.ipv4)), a.port


def endpoint_of(w: destination_lite.WeightedAddr, set_labels: dict[str, str]) -> Endpoint:
    """One WeightedAddr as the proxy's Endpoint."""
    identity: str | None = None
    if w.HasField("tls_identity") and w.tls_identity.WhichOneof("strategy") == "dns_like_identity":
        identity = w.tls_identity.dns_like_identity.name or None
    proxy_port: int | None = None
    hint: str | None = None
    legacy = False
    if w.HasField("protocol_hint"):
        hint = w.protocol_hint.WhichOneof("protocol")  # h2: its proxy takes HTTP/1 over HTTP/2
        if w.protocol_hint.HasField("opaque_transport"):
            proxy_port = w.protocol_hint.opaque_transport.inbound_port or None
            legacy = w.protocol_hint.opaque_transport.tether_legacy_transport_header
    labels = {f"dst_{k}": v for k, v in set_labels.items()}
    labels.update({f"dst_{k}": v for k, v in w.metric_labels.items()})
    return Endpoint(tcp_addr(w.addr), weight=max(1, w.weight or 1), identity=identity, protocol_hint=hint,
                    proxy_port=proxy_port, labels=tuple(sorted(labels.items())), legacy_transport_header=legacy)


def tcp_address(addr: Addr) -> net_lite.TcpAddress:
    """An (ip, port) as a TcpAddress message."""
    ip = ipaddress.ip_address(addr[0])
    if ip.version == 6:
        n = int(ip)
        return net_lite.TcpAddress(ip=net_lite.IPAddress(ipv6=net_lite.IPv6(first=n >> 64, last=n & (2**64 - 1))),
                                  port=addr[1])
    return net_lite.TcpAddress(ip=net_lite.IPAddress(ipv4=int(ip)), port=addr[1])


def method_of(m: http_types_lite.HttpMethod) -> bytes:
    """An HttpMethod message as the request line spells it."""
    if m.WhichOneof("type") == "unregistered":
        return m.unregistered.encode("latin-1")
    return http_types_lite.HttpMethod.Registered.Name(m.registered).encode()
