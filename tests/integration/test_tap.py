"""Tap end to end on a local mesh: `tether viz tap` against pods' proxies with real curl traffic.

The events printed match the requests sent (method, path, status, in order), the filters narrow
them, -o json carries the seeds' jq shape, and an identity the proxy does not authorize is refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from test_local_mesh import HTTP_APP, TETHER, Mesh

from tether.testing import netns
from tether.testing.procs import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.netns]

_reason = netns.available()
if _reason is not None:
    pytest.skip(f"network namespaces unavailable: {_reason}", allow_module_level=True)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("tap") / "state")
    try:
        m.up()
        m.tether("run", "web", "--port", "8080", "--", *HTTP_APP)
        m.tether("run", "client", "--", "sleep", "3600")
        m.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n"
                "spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n")
        wait_for(lambda: m.exec("client-0", "curl", "-sf", "http://web/", check=False).returncode == 0, 20,
                 what="web reachable")
        yield m
    finally:
        if (m.state / "mesh.json").exists():
            subprocess.run([*TETHER, "down", "--state-dir", str(m.state)], capture_output=True, timeout=120)


class Tap:
    """A running `tether viz tap`, its stdout lines collected by a thread."""

    def __init__(self, mesh: Mesh, *args: str) -> None:
        self.proc = subprocess.Popen([*TETHER, "viz", "tap", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd="/tmp", env={**os.environ, "TETHER_STATE_DIR": str(mesh.state)})
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_lines(self, pred: object, count: int, timeout: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [ln for ln in list(self.lines) if pred(ln)]  # type: ignore[operator]
            if len(got) >= count:
                return got
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
        raise AssertionError(f"wanted {count} lines, got {self.lines!r} {err}")

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        return self.proc.stderr.read() if self.proc.stderr else ""


def _tap_running(mesh: Mesh, pod: str) -> bool:
    m = mesh.exec(pod, "curl", "-s", "http://127.0.0.1:4191/metrics", check=False).stdout
    return "tether_tap_observers 1" in m


def _wait_tap(mesh: Mesh, tap: Tap, pod: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if _tap_running(mesh, pod):
            return
        if tap.proc.poll() is not None:
            raise AssertionError(f"tap exited: {tap.proc.stderr.read() if tap.proc.stderr else ''}")
        time.sleep(0.1)
    raise AssertionError("the tap never started on the proxy")


def _curl(mesh: Mesh, client: str, *args: str) -> None:
    r = mesh.exec(client, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *args)
    assert r.stdout.strip() in ("200", "404", "501"), r.stdout


def test_tap_prints_each_request_in_order(mesh: Mesh) -> None:
    web = mesh.pods("web")[0]["name"]
    client = mesh.pods("client")[0]["name"]
    tap = Tap(mesh, "deploy/web")
    try:
        _wait_tap(mesh, tap, web)
        sent = [("GET", "/", 200), ("GET", "/nope-1", 404), ("HEAD", "/", 200), ("GET", "/nope-2", 404)]
        for method, path, _ in sent:
            _curl(mesh, client, "-X", method, *(["-I"] if method == "HEAD" else []), f"http://web{path}")
        ends = tap.wait_lines(lambda ln: ln.startswith("end "), len(sent))
    finally:
        tap.stop()
    reqs = [ln for ln in tap.lines if ln.startswith("req ")]
    rsps = [ln for ln in tap.lines if ln.startswith("rsp ")]
    assert len(reqs) == len(rsps) == len(ends) == len(sent), tap.lines
    ip = mesh.pods("web")[0]["ip"]
    for (method, path, status), req, rsp, end in zip(sent, reqs, rsps, ends, strict=True):
        m = re.fullmatch(r"req id=(\d+):(\d+) proxy=in  src=[\d.]+:\d+ dst=([\d.]+):8080 tls=true "
                         r":method=(\S+) :authority=web :path=(\S+)", req)
        assert m, req
        assert (m.group(4), m.group(5), m.group(3)) == (method, path, ip)
        rid = f"{m.group(1)}:{m.group(2)}"
        assert re.fullmatch(rf"rsp id={rid} proxy=in  src=\S+ dst=\S+ tls=true :status={status} latency=\d+µs",
                            rsp), rsp
        assert re.fullmatch(rf"end id={rid} proxy=in  src=\S+ dst=\S+ tls=true duration=\d+µs "
                            r"response-length=\d+B", end), end
    # The events come in the order the requests were sent: ids increase.
    ids = [int(re.search(r"id=\d+:(\d+)", r).group(1)) for r in reqs]  # type: ignore[union-attr]
    assert ids == sorted(ids)


def test_tap_filters_and_json(mesh: Mesh) -> None:
    web = mesh.pods("web")[0]["name"]
    client = mesh.pods("client")[0]["name"]
    tap = Tap(mesh, "deploy/web", "--path", "/keep", "--method", "GET", "-o", "json")
    try:
        _wait_tap(mesh, tap, web)
        _curl(mesh, client, "http://web/drop-me")
        _curl(mesh, client, "-X", "POST", "http://web/keep-post")
        _curl(mesh, client, "http://web/keep-this")
        events = [json.loads(ln) for ln in tap.wait_lines(lambda ln: '"responseEnd"' in ln, 1)]
    finally:
        tap.stop()
    docs = [json.loads(ln) for ln in tap.lines]
    paths = [d["requestInit"]["http"]["path"] for d in docs if "requestInit" in d]
    assert paths == ["/keep-this"], docs
    # The seeds' jq: `.requestInit // .responseInit | .http`
    init = next(d for d in docs if "requestInit" in d)
    assert init["requestInit"]["http"]["method"] == "GET"
    assert init["proxyDirection"] == "INBOUND"
    assert init["destination"]["metadata"]["deployment"] == "web"
    assert any(h["name"] == "user-agent" for h in init["requestInit"]["http"]["headers"])
    rsp = next(d for d in docs if "responseInit" in d)
    assert rsp["responseInit"]["http"]["httpStatus"] == 404
    assert events[0]["responseEnd"]["http"]["responseBytes"] > 0


def test_tap_status_filter(mesh: Mesh) -> None:
    web = mesh.pods("web")[0]["name"]
    client = mesh.pods("client")[0]["name"]
    tap = Tap(mesh, "deploy/web", "--status", "404")
    try:
        _wait_tap(mesh, tap, web)
        _curl(mesh, client, "http://web/")
        _curl(mesh, client, "http://web/status-missing")
        _curl(mesh, client, "http://web/")
        tap.wait_lines(lambda ln: ln.startswith("end "), 1)
    finally:
        tap.stop()
    reqs = [ln for ln in tap.lines if ln.startswith("req ")]
    assert len(reqs) == 1 and ":path=/status-missing" in reqs[0], tap.lines
    assert [ln.split()[0] for ln in tap.lines] == ["req", "rsp", "end"]


def test_tap_outbound_with_to_and_wide(mesh: Mesh) -> None:
    client = mesh.pods("client")[0]["name"]
    tap = Tap(mesh, "deploy/client", "--to", "deploy/web", "-o", "wide")
    try:
        _wait_tap(mesh, tap, client)
        _curl(mesh, client, "http://web/outbound")
        ends = tap.wait_lines(lambda ln: ln.startswith("end "), 1)
    finally:
        tap.stop()
    req = next(ln for ln in tap.lines if ln.startswith("req "))
    assert " proxy=out " in req and ":path=/outbound" in req and " tls=true " in req, req
    assert "src_deployment=client" in req and "dst_service=web" in req, req
    assert "dst_namespace=default" in ends[0]


def test_unauthorized_identity_is_refused(mesh: Mesh) -> None:
    from tether.viz.tap import ClientCredentials, TapError, observe_request, tap_pods
    from tether.viz.tap import Mesh as TapMesh

    m = TapMesh.load(str(mesh.state))
    pods = m.select("deploy/web", "default")
    s = mesh.settings()
    intruder = f"client.default.serviceaccount.identity.{s['controller_namespace']}.{s['trust_domain']}"
    creds = ClientCredentials(m, intruder)
    with pytest.raises(TapError, match=r"PERMISSION_DENIED: identity client\.default\.\S+ is not authorized to tap"):
        asyncio.run(tap_pods(pods, creds, observe_request(), lambda p, e: None, duration=10))
    # Through the CLI, the authorized identity gets a stream (the previous test), and a missing pod is one line.
    r = mesh.tether("viz", "tap", "deploy/nothing-here", check=False)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "no running meshed pods for deploy/nothing-here in namespace default" in r.stderr


def test_profile_from_tap_lists_the_routes_seen(mesh: Mesh) -> None:
    import yaml

    from tether.core.resources.loader import load_text

    web = mesh.pods("web")[0]["name"]
    proc = subprocess.Popen([*TETHER, "profile", "web", "--tap", "deploy/web", "--tap-duration", "6s"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/tmp",
                            env={**os.environ, "TETHER_STATE_DIR": str(mesh.state)})
    try:
        deadline = time.monotonic() + 5
        while not _tap_running(mesh, web) and time.monotonic() < deadline:
            time.sleep(0.1)
        client = mesh.pods("client")[0]["name"]
        for path in ("/books", "/books?page=2", "/authors.json"):
            _curl(mesh, client, f"http://web{path}")
        _curl(mesh, client, "-X", "POST", "http://web/books")
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    doc = yaml.safe_load(out)
    assert doc["metadata"]["name"] == "web.default.svc.cluster.local"
    names = [r["name"] for r in doc["spec"]["routes"]]
    assert {"GET /books", "GET /authors.json", "POST /books"} <= set(names), names
    assert load_text(out, "profile").ok
