"""The local store: a directory of YAML files and the workload registry, listed and watched per kind."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from tether.cli.main import main
from tether.core.resources.events import ResourceEvent
from tether.platform.local import apply as lib
from tether.platform.local.store import LocalStore
from tether.platform.local.workloads import Workload, WorkloadPort, WorkloadRegistry
from tether.runtime.watch import Change, Snapshot

SVC = """\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: prod}}
spec:
  selector: {{app: {name}}}
  ports: [{{port: {port}, targetPort: 8080}}]
"""


def write(path: Path, text: str) -> None:
    """Write so that the store sees a new signature even within one mtime tick."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_lists_multi_document_files_of_any_name(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path / "a.yaml", SVC.format(name="web", port=80) + "---\n" + SVC.format(name="api", port=81))
    write(tmp_path / "sub" / "whatever.yml", SVC.format(name="db", port=5432))
    write(tmp_path / "notes.txt", "not yaml at all: [")
    store = LocalStore(tmp_path)
    assert [r.name for r in store.list("Service")] == ["api", "db", "web"]
    assert store.get("Service", "prod", "web") is not None
    assert store.list("Service", "other") == []
    assert store.source_errors() == []


def test_watch_snapshot_then_ordered_events(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", SVC.format(name="web", port=80))
    store = LocalStore(tmp_path)
    sub = store.watch("Service")
    first = sub.poll()
    assert isinstance(first, Snapshot) and set(first.state) == {("prod", "web")}
    v0 = store.version("Service")
    write(tmp_path / "a.yaml", SVC.format(name="web", port=90) + "---\n" + SVC.format(name="api", port=81))
    assert store.scan()
    events = []
    while (u := sub.poll()) is not None:
        assert isinstance(u, Change)
        events.append(u)
    got = [(e.change.type, e.change.resource.name) for e in events]
    assert got == [("ADDED", "api"), ("MODIFIED", "web")]
    assert [e.version for e in events] == [v0 + 1, v0 + 2]
    (tmp_path / "a.yaml").unlink()
    store.scan()
    deleted = [sub.poll(), sub.poll()]
    assert all(isinstance(u, Change) and isinstance(u.change, ResourceEvent) for u in deleted)
    assert sorted(u.change.type for u in deleted if isinstance(u, Change)) == ["DELETED", "DELETED"]
    assert store.list("Service") == []


def test_invalid_edit_keeps_last_good_and_is_reported(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", SVC.format(name="web", port=80))
    store = LocalStore(tmp_path)
    sub = store.watch("Service")
    sub.poll()
    write(tmp_path / "a.yaml", SVC.format(name="web", port=99999))
    store.scan()
    assert sub.poll() is None  # nothing changed for watchers
    svc = store.get("Service", "prod", "web")
    assert svc is not None and svc.spec.ports[0].port == 80  # type: ignore[attr-defined]
    (err,) = store.source_errors()
    assert err.source == str(tmp_path / "a.yaml")
    assert err.errors == (
        f"{tmp_path / 'a.yaml'}: document 1 (Service prod/web): spec.ports[0].port: port 99999 is out of range 1-65535",
    )
    assert "store_invalid_loads_total 1" in store.metrics_text()
    assert "store_invalid_sources 1" in store.metrics_text()
    write(tmp_path / "a.yaml", SVC.format(name="web", port=81))
    store.scan()
    u = sub.poll()
    assert isinstance(u, Change) and u.change.type == "MODIFIED"
    assert store.source_errors() == []


def test_same_object_in_two_files_is_a_conflict(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", SVC.format(name="web", port=80))
    write(tmp_path / "b.yaml", SVC.format(name="web", port=81))
    store = LocalStore(tmp_path)
    svc = store.get("Service", "prod", "web")
    assert svc is not None and svc.spec.ports[0].port == 80  # type: ignore[attr-defined]
    (err,) = store.source_errors()
    assert "also defined in" in err.errors[0] and err.source == str(tmp_path / "b.yaml")


def test_workloads_come_from_the_registry(tmp_path: Path) -> None:
    reg = WorkloadRegistry(tmp_path / "state")
    reg.register(Workload("web-1", "prod", "web", ("10.0.0.5",), (WorkloadPort(8080, "http"),), {"app": "web"}))
    store = LocalStore(tmp_path / "res", tmp_path / "state")
    (w,) = store.list("Workload")
    assert w.name == "web-1" and w.metadata.labels == {"app": "web"}
    assert w.spec.addresses == ["10.0.0.5"]  # type: ignore[attr-defined]
    reg.remove("prod", "web-1")
    store.scan()
    assert store.list("Workload") == []


def test_run_picks_up_an_edit_within_a_second(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", SVC.format(name="web", port=80))
    store = LocalStore(tmp_path)

    async def scenario() -> tuple[float, object]:
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(store.run(stop))
            sub = store.watch("Service")
            assert isinstance(await sub.next(), Snapshot)
            t0 = time.monotonic()
            write(tmp_path / "b.yaml", SVC.format(name="api", port=81))
            async with asyncio.timeout(2):
                u = await sub.next()
            stop.set()
        return time.monotonic() - t0, u

    took, u = asyncio.run(scenario())
    assert took < 1.0
    assert isinstance(u, Change) and u.change.resource.name == "api"


SP = """\
# the web profile
apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata: {name: web.prod.svc.cluster.local, namespace: prod}
spec:
  routes:
  - name: home
    condition: {method: GET, pathRegex: /}
    timeout: TIMEOUT
"""


def test_apply_creates_configures_and_keeps_other_documents(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    # A user's own file with two objects and a comment.
    write(store / "mine.yaml", SP.replace("TIMEOUT", "1s") + "---\n" + SVC.format(name="web", port=80))
    report = lib.apply(store, [("in.yaml", SP.replace("TIMEOUT", "2s"))])
    assert [(o.ref, o.action) for o in report.outcomes] == [("serviceprofile/web.prod.svc.cluster.local", "configured")]
    text = (store / "mine.yaml").read_text()
    assert "# the web profile" not in text.split("---")[0] or "2s" in text  # replaced in place
    assert "timeout: 2s" in text and "kind: Service\n" in text
    again = lib.apply(store, [("in.yaml", SP.replace("TIMEOUT", "2s"))])
    assert again.outcomes[0].action == "unchanged"
    new = lib.apply(store, [("in.yaml", SVC.format(name="api", port=81))])
    assert new.outcomes[0].action == "created"
    assert Path(new.outcomes[0].path).name == "service-prod-api.yaml"
    assert [r.name for r in LocalStore(store).list("Service")] == ["api", "web"]
    gone = lib.delete(store, [("in.yaml", SVC.format(name="api", port=81))])
    assert gone.outcomes[0].action == "deleted"
    assert not (store / "service-prod-api.yaml").exists()
    lib.delete(store, [("in.yaml", SVC.format(name="web", port=81))])
    assert [r.KIND for r in LocalStore(store).list("ServiceProfile")] == ["ServiceProfile"]
    assert LocalStore(store).list("Service") == []


def test_apply_refuses_everything_when_one_document_is_bad(tmp_path: Path) -> None:
    bad = SVC.format(name="web", port=80) + "---\n" + SP.replace("TIMEOUT", "soon")
    with pytest.raises(lib.ApplyError) as e:
        lib.apply(tmp_path, [("bad.yaml", bad)])
    assert e.value.errors == [
        "bad.yaml: document 2 (ServiceProfile prod/web.prod.svc.cluster.local): spec.routes[0].timeout: "
        "invalid duration 'soon': want a number and a unit (ms, s, m, h), e.g. 500ms or 1m30s"
    ]
    assert list(tmp_path.iterdir()) == []


def test_cli_apply_dry_run_get_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.yaml"
    src.write_text(SP.replace("TIMEOUT", "1s"))
    store = tmp_path / "store"
    assert main(["apply", "-f", str(src), "--dry-run", "--resources-dir", str(store)]) == 0
    assert capsys.readouterr().out == "serviceprofile/web.prod.svc.cluster.local -n prod created (dry run)\n"
    assert not store.exists()
    assert main(["apply", "-f", str(src), "--resources-dir", str(store)]) == 0
    assert capsys.readouterr().out == "serviceprofile/web.prod.svc.cluster.local -n prod created\n"
    assert main(["get", "sp", "-n", "prod", "--resources-dir", str(store)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split() == ["prod", "web.prod.svc.cluster.local", "linkerd.io/v1alpha2"]
    assert main(["get", "sp", "-o", "json", "--resources-dir", str(store)]) == 0
    assert '"pathRegex": "/"' in capsys.readouterr().out
    src.write_text(SP.replace("TIMEOUT", "1s").replace("pathRegex: /", "pathRegex: '('"))
    assert main(["apply", "-f", str(src), "--resources-dir", str(store)]) == 1
    err = capsys.readouterr().err
    assert f"error: {src}: document 1 (ServiceProfile prod/web.prod.svc.cluster.local): " in err
    assert "spec.routes[0].condition.pathRegex: invalid regular expression '('" in err
    assert main(["get", "bogus", "--resources-dir", str(store)]) == 2
    assert "tether get: KIND: unknown kind 'bogus'" in capsys.readouterr().err
    assert main(["apply", "-f", str(tmp_path / "nope.yaml"), "--resources-dir", str(store)]) == 1
    assert f"error: -f {tmp_path / 'nope.yaml'}: no such file or directory" in capsys.readouterr().err


def test_workloads_cannot_be_applied_and_deleting_a_missing_object_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wl = (
        "apiVersion: workload.tether.io/v1alpha1\nkind: Workload\nmetadata: {name: w, namespace: prod}\n"
        "spec: {serviceAccount: web, addresses: [10.0.0.9]}\n"
    )
    with pytest.raises(lib.ApplyError) as e:
        lib.apply(tmp_path, [("w.yaml", wl)])
    assert e.value.errors == [
        "w.yaml: document 1 (Workload prod/w): Workload objects come from the workload registry "
        "(tether workload register), not from files"
    ]
    src = tmp_path / "svc.yaml"
    src.write_text(SVC.format(name="web", port=80))
    assert main(["delete", "-f", str(src), "--resources-dir", str(tmp_path / "store")]) == 1
    assert capsys.readouterr().err == "error: service/web -n prod not found\n"


def test_cli_apply_from_stdin_refusal_and_get_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    store = str(tmp_path / "store")
    monkeypatch.setattr("sys.stdin", io.StringIO(SVC.format(name="web", port=80)))
    assert main(["apply", "-f", "-", "--dry-run=server", "--resources-dir", store]) == 0
    assert capsys.readouterr().out == "service/web -n prod created (dry run)\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(SVC.format(name="web", port=80)))
    monkeypatch.setenv("TETHER_RESOURCES_DIR", store)
    assert main(["apply", "-f", "-"]) == 0
    assert capsys.readouterr().out == "service/web -n prod created\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text(SVC.format(name="a", port=0) + "---\n" + SVC.format(name="b", port=70000))
    assert main(["apply", "-f", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"error: {bad}: document ") for line in lines[:2])
    assert lines[2] == "tether apply: nothing was written (2 error(s))"
    assert main(["get", "svc", "-n", "prod", "-A"]) == 2
    assert capsys.readouterr().err == "tether get: use -n/--namespace or -A/--all-namespaces, not both\n"
    assert main(["get", "svc", "-A", "-o", "yaml"]) == 0
    assert capsys.readouterr().out.startswith("apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n")
    assert main(["get", "svc", "-n", "other"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == "No resources found in namespace other.\n"
