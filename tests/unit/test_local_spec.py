"""The local platform's pure parts: workload specs, annotations read like the injector, pod names files."""

from __future__ import annotations

import pytest

from tether.platform.local.network import hosts_file, resolv_conf
from tether.platform.local.spec import PodSettings, PortSpec, SpecError, WorkloadSpec, parse_port, pod_settings


def spec(**kw: object) -> WorkloadSpec:
    base: dict[str, object] = {"name": "web", "namespace": "default", "command": ("true",)}
    return WorkloadSpec(**{**base, **kw})  # type: ignore[arg-type]


def test_annotations_set_the_proxy_and_proxy_init() -> None:
    s = pod_settings({
        "config.linkerd.io/opaque-ports": "3306, 5000-5010",
        "config.linkerd.io/skip-inbound-ports": "9999",
        "config.linkerd.io/skip-outbound-ports": "25",
        "config.linkerd.io/skip-subnets": "10.1.2.3/16",
        "config.linkerd.io/proxy-log-level": "debug,tether.proxy=trace",
        "config.linkerd.io/proxy-await": "disabled",
        "example.com/owner": "team-a",
    })
    assert s == PodSettings(inject=True, proxy_await=False, log_level="debug,tether.proxy=trace",
                            opaque_ports=("3306", "5000-5010"), skip_inbound_ports=("9999",),
                            skip_outbound_ports=("25",), skip_subnets=("10.1.0.0/16",))
    assert not pod_settings({"linkerd.io/inject": "disabled"}).inject


@pytest.mark.parametrize(("annotations", "message"), [
    ({"config.linkerd.io/opaque-ports": "mysql"},
     "annotation config.linkerd.io/opaque-ports: 'mysql' is not a port (1-65535) or a range like 5000-5010"),
    ({"config.linkerd.io/skip-inbound-ports": "0"}, "annotation config.linkerd.io/skip-inbound-ports: '0'"),
    ({"config.linkerd.io/skip-subnets": "10.0.0.0/33"},
     "annotation config.linkerd.io/skip-subnets: '10.0.0.0/33' is not a network like 10.0.0.0/8"),
    ({"config.linkerd.io/proxy-await": "yes"},
     "annotation config.linkerd.io/proxy-await: 'yes' must be enabled or disabled"),
    ({"config.linkerd.io/proxy-log-level": "WARN; rm -rf"}, "is not a log level spec"),
    ({"config.linkerd.io/proxy-cpu-limit": "1"},
     "annotation config.linkerd.io/proxy-cpu-limit: not supported by the local platform (supported: "),
    ({"config.alpha.linkerd.io/proxy-wait-before-exit-seconds": "5"}, "not supported by the local platform"),
    ({"not a key": "x"}, "annotation 'not a key': not a valid annotation key"),
    ({"local.tether.io/linkerd2-proxy": "linkerd2-proxy"},
     "annotation local.tether.io/linkerd2-proxy: 'linkerd2-proxy' must be the absolute path of a linkerd2-proxy"),
    ({"local.tether.io/proxy-binary": "/x"}, "annotation local.tether.io/proxy-binary: not supported by the local"),
])
def test_bad_annotations_are_refused_by_name(annotations: dict[str, str], message: str) -> None:
    with pytest.raises(SpecError) as e:
        pod_settings(annotations)
    assert message in str(e.value)


@pytest.mark.parametrize(("kw", "message"), [
    ({"command": ()}, "no command: give the workload's command after --"),
    ({"name": "Web"}, "name 'Web' is not a DNS label"),
    ({"namespace": "a_b"}, "namespace 'a_b' is not a DNS label"),
    ({"service_account": "x" * 64}, "service account"),
    ({"name": "w" * 59}, "longer than 58 characters"),
    ({"replicas": 1000}, "replicas 1000: must be 0-256"),
    ({"ports": (PortSpec(4143),)}, "port 4143: used by the pod's proxy"),
    ({"ports": (PortSpec(80), PortSpec(80))}, "port 80: given twice"),
    ({"labels": {"app": "a b"}}, "label app='a b': not a valid label value"),
    ({"labels": {"-x": "1"}}, "label '-x': not a valid label key"),
    ({"annotations": {"config.linkerd.io/opaque-ports": "x"}}, "annotation config.linkerd.io/opaque-ports"),
    ({"annotations": {"local.tether.io/linkerd2-proxy": "/opt/linkerd2-proxy"}, "explicit": True},
     "--explicit: not with annotation local.tether.io/linkerd2-proxy"),
])
def test_bad_specs_name_the_field(kw: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as e:
        spec(**kw)
    assert message in str(e.value)


def test_spec_round_trips_and_names_pods() -> None:
    s = spec(ports=(PortSpec(8080, "http"),), replicas=3, labels={"tier": "front"},
             annotations={"config.linkerd.io/opaque-ports": "9300"}, env={"A": "1"}, working_dir="/srv")
    assert WorkloadSpec.from_dict(s.to_dict(), "spec.yaml") == s
    assert s.sa == "web" and s.pod_name(2) == "web-2"
    assert s.pod_labels == {"app": "web", "tier": "front"}
    with pytest.raises(SpecError, match=r"^spec.yaml: not a workload spec"):
        WorkloadSpec.from_dict({"name": "web"}, "spec.yaml")
    with pytest.raises(SpecError, match=r"^spec.yaml: replicas -1"):
        WorkloadSpec.from_dict({**s.to_dict(), "replicas": -1}, "spec.yaml")


def test_ports_parse_with_names() -> None:
    assert parse_port("8080") == PortSpec(8080)
    assert parse_port("9090:grpc") == PortSpec(9090, "grpc")
    for bad in ("http", "0", "70000", "80:Not_A_Label"):
        with pytest.raises(SpecError, match=r"^--port "):
            parse_port(bad)


def test_a_pods_hosts_file_names_services_like_cluster_dns() -> None:
    text = hosts_file("client-0", "10.9.0.5", "shop", [("shop", "web", "10.96.0.1"), ("ops", "db", "10.96.0.2")],
                      "cluster.local")
    lines = text.splitlines()
    assert "10.9.0.5\tclient-0" in lines
    # The short name only for Services of the pod's own namespace, as cluster DNS search domains give.
    assert "10.96.0.1\tweb.shop.svc.cluster.local web.shop.svc web.shop web" in lines
    assert "10.96.0.2\tdb.ops.svc.cluster.local db.ops.svc db.ops" in lines
    assert resolv_conf("shop", "cluster.local").startswith("search shop.svc.cluster.local svc.cluster.local")


def test_a_pod_can_ask_for_linkerds_proxy_with_the_environment_linkerds_injector_gives_it() -> None:
    from pathlib import Path

    from tether.platform.local.linkerd2 import proxy_env

    assert pod_settings({"local.tether.io/linkerd2-proxy": "/opt/l5d/linkerd2-proxy"}).linkerd2_proxy == \
        "/opt/l5d/linkerd2-proxy"
    env = proxy_env(namespace="shop", pod="web-0", pod_ip="10.234.0.7", identity="web.shop.serviceaccount.identity."
                    "linkerd.cluster.local", token_path=Path("/run/t/token"), identity_dir=Path("/run/t/identity"),
                    trust_anchors_pem="PEM", identity_addr="10.234.0.1:8080", identity_name="linkerd-identity.x",
                    destination_addr="10.234.0.1:8086", destination_name="linkerd-destination.x",
                    cluster_domain="cluster.local", cluster_networks="10.234.0.0/16,10.96.0.0/16",
                    inbound_ports=[8080, 9090], opaque_ports=("3306",), log_level=None)
    # The control plane by address and TLS name (Linkerd's proxy dials a non-loopback one only over TLS).
    assert (env["LINKERD2_PROXY_DESTINATION_SVC_ADDR"], env["LINKERD2_PROXY_DESTINATION_SVC_NAME"]) == \
        ("10.234.0.1:8086", "linkerd-destination.x")
    assert (env["LINKERD2_PROXY_POLICY_SVC_ADDR"], env["LINKERD2_PROXY_POLICY_SVC_NAME"]) == \
        ("10.234.0.1:8086", "linkerd-destination.x")
    assert (env["LINKERD2_PROXY_IDENTITY_SVC_ADDR"], env["LINKERD2_PROXY_IDENTITY_SVC_NAME"]) == \
        ("10.234.0.1:8080", "linkerd-identity.x")
    assert env["LINKERD2_PROXY_POLICY_WORKLOAD"] == '{"ns":"shop","pod":"web-0"}'
    assert env["LINKERD2_PROXY_DESTINATION_CONTEXT"] == '{"ns":"shop","nodeName":"local","pod":"web-0"}'
    assert env["LINKERD2_PROXY_IDENTITY_DIR"] == "/run/t/identity"
    assert env["LINKERD2_PROXY_INBOUND_PORTS"] == "8080,9090"
    assert env["LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION"] == "3306"
    assert env["LINKERD2_PROXY_LOG"] == "warn,linkerd=info"
    assert env["LINKERD2_PROXY_INBOUND_LISTEN_ADDR"] == "0.0.0.0:4143"
