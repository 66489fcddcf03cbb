"""Static discovery: validation errors, reloads on change, watches and diffs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tether.core.discovery.endpoints import Endpoint, EndpointDiff, EndpointSet
from tether.proxy.discovery import DiscoveryError, StaticDiscovery, feed, normalize_authority

GOOD = """
destinations:
  "Web.Default.svc.cluster.local:80":
    - "10.0.0.1:8080"
    - addr: "10.0.0.2:8080"
      weight: 2
      identity: web.default.serviceaccount.identity.linkerd.cluster.local
      proxy_port: 4143
      protocol_hint: h2
      labels: {pod: web-2}
  "empty.default.svc.cluster.local:80": []
"""


def write(path: Path, text: str) -> None:
    path.write_text(text)


def test_loads_and_resolves_authorities(tmp_path: Path) -> None:
    f = tmp_path / "d.yaml"
    write(f, GOOD)
    d = StaticDiscovery(str(f))
    assert d.authorities == ["empty.default.svc.cluster.local:80", "web.default.svc.cluster.local:80"]
    eps = d.resolve_now(b"web.default.svc.cluster.local")  # default port 80
    assert eps is not None
    assert eps.get(("10.0.0.2", 8080)) == Endpoint.of(
        "10.0.0.2:8080",
        weight=2,
        identity="web.default.serviceaccount.identity.linkerd.cluster.local",
        proxy_port=4143,
        protocol_hint="h2",
        labels={"pod": "web-2"},
    )
    assert d.resolve_now("empty.default.svc.cluster.local:80") == EndpointSet()
    assert d.watch("unknown.example.com:80") is None
    assert d.watch("web.default.svc.cluster.local:8080") is None


def test_json_and_yaml_files_give_the_same_destinations(tmp_path: Path) -> None:
    import json

    import yaml

    as_yaml, as_json = tmp_path / "d.yaml", tmp_path / "d.json"
    write(as_yaml, GOOD)
    write(as_json, json.dumps(yaml.safe_load(GOOD), indent=2))
    a, b = StaticDiscovery(str(as_yaml)), StaticDiscovery(str(as_json))
    assert b.authorities == a.authorities
    for authority in a.authorities:
        assert b.resolve_now(authority) == a.resolve_now(authority)
    # A flow mapping is YAML, not JSON: still read (by YAML), and JSON's mistakes are still named.
    write(as_json, '{destinations: {"web:80": ["10.0.0.1:80"]}}')
    assert StaticDiscovery(str(as_json)).authorities == ["web:80"]
    write(as_json, '{"destinations": {"web:80": "10.0.0.1:80"}}')
    with pytest.raises(DiscoveryError, match=r"destinations\['web:80'\]: must be a list"):
        StaticDiscovery(str(as_json))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("destinations: [1]", "destinations: must map"),
        ("other: {}", "unknown top-level key"),
        ('destinations: {"web": ["10.0.0.1:80"]}', r"destinations\['web'\]: 'web' has no port"),
        ('destinations: {"web:80": "10.0.0.1:80"}', r"destinations\['web:80'\]: must be a list"),
        ('destinations: {"web:80": ["10.0.0.1"]}', r"\['web:80'\]\[0\]: '10.0.0.1' is not ip:port"),
        ('destinations: {"web:80": ["host:80"]}', "is not an IP address"),
        ('destinations: {"web:80": [{addr: "10.0.0.1:80", weight: 0}]}', r"\[0\]\.weight: must be an int"),
        ('destinations: {"web:80": [{addr: "10.0.0.1:80", wieght: 2}]}', r"unknown key\(s\) \['wieght'\]"),
        ('destinations: {"web:80": [{weight: 2}]}', r"\[0\]\.addr: required"),
        ('destinations: {"web:80": [{addr: "10.0.0.1:80", proxy_port: 0}]}', "proxy_port"),
        ('destinations: {"web:80": [{addr: "10.0.0.1:80", protocol_hint: h3}]}', "protocol_hint"),
        ('destinations: {"web:80": [{addr: "10.0.0.1:80", labels: {a: 1}}]}', "labels"),
        ('destinations: {"web:80": ["10.0.0.1:80", "10.0.0.1:80"]}', r"\[1\]: duplicate address"),
        ('destinations: {"web:80": [], "WEB:80": []}', "same authority"),
        ("destinations: {", "not valid YAML"),
    ],
)
def test_invalid_files_are_rejected_naming_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "bad.yaml"
    write(f, text)
    with pytest.raises(DiscoveryError, match=message) as exc:
        StaticDiscovery(str(f))
    assert str(exc.value).startswith(str(f))


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DiscoveryError, match="cannot read"):
        StaticDiscovery(str(tmp_path / "nope.yaml"))


def test_normalize_authority() -> None:
    assert normalize_authority("Web.NS.svc.cluster.local.:80") == "web.ns.svc.cluster.local:80"
    assert normalize_authority("web", 8080) == "web:8080"
    assert normalize_authority("[::1]:80") == "[::1]:80"
    assert normalize_authority("[::1]", 80) == "[::1]:80"
    for bad in ("web", "::1:80", "web:0", ":80", "[::1"):
        with pytest.raises(ValueError):
            normalize_authority(bad)


class FakeFile:
    """An injected file: its content and a version the test bumps."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.version = 1

    def change(self, text: str) -> None:
        self.text = text
        self.version += 1

    def discovery(self) -> StaticDiscovery:
        return StaticDiscovery("fake.yaml", version=lambda p: self.version, read=lambda p: self.text.encode())


def test_reload_on_change_updates_watches_and_keeps_last_good_on_error() -> None:
    f = FakeFile('destinations: {"web:80": ["10.0.0.1:80"]}')
    d = f.discovery()
    resolved = d.watch("web:80")
    assert resolved is not None
    w = resolved.endpoints
    assert not d.check()  # unchanged
    f.change('destinations: {"web:80": ["10.0.0.1:80", "10.0.0.2:80"]}')
    assert d.check()
    assert w.state.addrs == {("10.0.0.1", 80), ("10.0.0.2", 80)}
    f.change('destinations: {"web:80": [{addr: "10.0.0.3:80", weight: -1}]}')
    assert not d.check()
    assert d.last_error is not None and "fake.yaml" in d.last_error and "weight" in d.last_error
    assert w.state.addrs == {("10.0.0.1", 80), ("10.0.0.2", 80)}  # last good kept
    assert d.reload_errors_total == 1
    assert not d.check()  # the same bad version is not re-parsed or re-logged
    assert d.reload_errors_total == 1
    f.change("destinations: {}")
    assert d.check()
    assert d.last_error is None
    assert len(w.state) == 0  # dropped from the file: the watch stays, empty
    again = d.watch("web:80")
    assert again is not None and again.endpoints is w


def test_real_file_changes_are_detected(tmp_path: Path) -> None:
    f = tmp_path / "d.yaml"
    write(f, 'destinations: {"web:80": ["10.0.0.1:80"]}')
    d = StaticDiscovery(str(f))
    tmp = tmp_path / "d.yaml.tmp"
    write(tmp, 'destinations: {"web:80": ["10.0.0.2:80"]}')
    tmp.replace(f)  # an atomic rename, as config managers write files
    assert d.check()
    assert d.resolve_now("web:80") == EndpointSet([Endpoint.of("10.0.0.2:80")])


class Sink:
    def __init__(self) -> None:
        self.snapshots: list[EndpointSet] = []
        self.diffs: list[EndpointDiff] = []
        self.changed = asyncio.Event()

    def apply(self, diff: EndpointDiff) -> None:
        self.diffs.append(diff)
        self.changed.set()

    def replace(self, endpoints: EndpointSet) -> None:
        self.snapshots.append(endpoints)
        self.changed.set()


def test_feed_sends_a_snapshot_then_diffs() -> None:
    f = FakeFile('destinations: {"web:80": ["10.0.0.1:80"]}')
    d = f.discovery()
    resolved = d.watch("web:80")
    assert resolved is not None

    async def main() -> None:
        sink = Sink()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(feed(resolved.endpoints.subscribe(), sink))
            async with asyncio.timeout(5):
                await sink.changed.wait()
                sink.changed.clear()
                assert sink.snapshots == [EndpointSet([Endpoint.of("10.0.0.1:80")])]
                f.change('destinations: {"web:80": ["10.0.0.2:80"]}')
                d.check()
                await sink.changed.wait()
            expected = EndpointDiff(add=(Endpoint.of("10.0.0.2:80"),), remove=(("10.0.0.1", 80),))
            assert sink.diffs == [expected]
            task.cancel()

    asyncio.run(main())
