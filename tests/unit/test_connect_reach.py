"""Where the proxy dials an endpoint, and whether a transport header goes first (connect.reach)."""

from __future__ import annotations

from tether.core.discovery.endpoints import Endpoint
from tether.proxy.connect import reach

ID = "web.default.serviceaccount.identity.linkerd.cluster.local"


def test_http_to_a_peer_proxy_port_names_the_application_port_in_a_header() -> None:
    t = reach(Endpoint(("10.0.0.1", 8080), identity=ID, proxy_port=4143), mtls=True)
    assert (t.dial, t.server_id, t.transport_port, t.legacy_transport_header) == (("10.0.0.1", 4143), ID, 8080, False)
    assert t.header_session  # and the HTTP version that follows
    # An endpoint hinted opaque forwards its connections as bytes: no session protocol then.
    o = reach(Endpoint(("10.0.0.1", 8080), identity=ID, protocol_hint="opaque", proxy_port=4143), mtls=True)
    assert (o.dial, o.transport_port, o.header_session) == (("10.0.0.1", 4143), 8080, False)


def test_opaque_to_a_peer_proxy_port_too_and_in_json_to_a_release_before_0_2_0() -> None:
    ep = Endpoint(("10.0.0.1", 8080), identity=ID, proxy_port=4143, legacy_transport_header=True)
    t = reach(ep, mtls=True, opaque=True)
    assert (t.dial, t.transport_port, t.legacy_transport_header) == (("10.0.0.1", 4143), 8080, True)
    # HTTP to such a peer: it serves no session protocol after a header, so its own address (where its
    # opaque port forwards what the client proxy sends).
    h = reach(ep, mtls=True)
    assert (h.dial, h.server_id, h.transport_port) == (("10.0.0.1", 8080), ID, None)


def test_without_mesh_tls_plaintext_and_no_header() -> None:
    ep = Endpoint(("10.0.0.1", 8080), identity=ID, proxy_port=4143)
    http = reach(ep, mtls=False)  # HTTP to the peer proxy's port discovery names
    assert (http.dial, http.server_id, http.transport_port) == (("10.0.0.1", 4143), None, None)
    tcp = reach(ep, mtls=False, opaque=True)  # an opaque stream: to the endpoint itself
    assert (tcp.dial, tcp.server_id, tcp.transport_port) == (("10.0.0.1", 8080), None, None)
    unmeshed = reach(Endpoint(("10.0.0.2", 80)), mtls=True)
    assert (unmeshed.dial, unmeshed.server_id) == (("10.0.0.2", 80), None)
