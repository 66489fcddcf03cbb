"""A small kubelet for tests: run a pod's containers, as the API server returned them, in a network
namespace at the pod's kwok-assigned IP.

kwok schedules pods and reports them running without running anything. For the pods of an
end-to-end test this runner does the part of a kubelet and a container runtime the mesh depends on,
reading everything from the pod object (so an injected pod runs exactly as injected):

- the network namespace with the pod's IP on a host bridge, and /etc/hosts with the pod's own name
  and the names a cluster's DNS would answer (given by the test);
- init containers in order, each to completion (a failed one fails the pod); a native sidecar
  (an init container with ``restartPolicy: Always``) is started and the next container waits for
  its startup probe;
- containers in order, each one's ``postStart`` exec hook run to completion before the next
  container starts (kubelet's order, which ``proxy-await`` relies on);
- ``env`` with ``value`` and ``valueFrom.fieldRef``, and ``$(VAR)`` references expanded as
  Kubernetes does; ``command``/``args`` over the image's entrypoint;
- volumes: a projected service-account token (a TokenRequest bound to the pod, with the
  volume's audience and expiry), downward-API files, emptyDir; each mounted at its ``mountPath``
  in a private mount namespace (``tether.testing.podexec``);
- ``securityContext.runAsUser``/``runAsGroup`` (container over pod); capabilities the container adds
  are given to a non-root process as ambient capabilities, because this host's binaries carry no
  file capabilities (the image's do: tests/integration/test_image.py runs the image's proxy-init
  under Kubernetes' own rules: added capabilities, no_new_privs, no ambient set).

Images are not pulled: the test maps each image (with its tag, or its name for any tag) to the command
its entrypoint would be (and, optionally, the environment its ENV would set), and each executable a
``command`` or an exec hook names to a command on this host. Anything else the pod
asks for that this runner cannot do is an error naming it, never silently skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tether.platform.local import network
from tether.testing.kubecluster import KubeCluster, wait_until
from tether.testing.procs import Proc, http_get

_FIELD = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")
_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


class PodSpecError(RuntimeError):
    """The pod asks for something this runner does not do."""


def field(pod: Mapping[str, Any], path: str) -> str:
    """A downward-API field of the pod (the fieldPaths the kubelet supports for env and files)."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": status.get("podIP"), "status.hostIP": status.get("hostIP"),
    }
    if path in simple:
        return str(simple[path] or "")
    m = _FIELD.match(path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    raise PodSpecError(f"fieldRef {path!r} is not supported by this runner")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a defined variable is replaced, $$ is a $, anything else stays."""
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _REF.sub(one, value)


def container_env(pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env") or ():
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
        elif "fieldRef" in (item.get("valueFrom") or {}):
            env[item["name"]] = field(pod, item["valueFrom"]["fieldRef"]["fieldPath"])
        else:
            raise PodSpecError(f"container {container['name']}: env {item['name']}: only value and fieldRef "
                               "are supported by this runner")
    if container.get("envFrom"):
        raise PodSpecError(f"container {container['name']}: envFrom is not supported by this runner")
    return env


def make_volumes(cluster: KubeCluster, pod: Mapping[str, Any], root: Path) -> dict[str, Path]:
    """Each of the pod's volumes as a directory under ``root`` (by volume name), with what the kubelet
    would put in it: a projected service-account token (a TokenRequest with the volume's audience and
    expiry, bound to the pod when the pod has a uid), downward-API files, a ConfigMap's keys, an
    empty directory. Anything else is a PodSpecError."""
    out: dict[str, Path] = {}
    for vol in pod["spec"].get("volumes") or ():
        d = root / vol["name"]
        d.mkdir(parents=True)
        os.chmod(d, 0o755)
        if "projected" in vol:
            for source in vol["projected"]["sources"]:
                _project(cluster, pod, vol["name"], d, source)
        elif "downwardAPI" in vol or "configMap" in vol:
            _project(cluster, pod, vol["name"], d, vol)
        elif "emptyDir" in vol:
            os.chmod(d, 0o777)
        else:
            raise PodSpecError(f"volume {vol['name']}: {sorted(vol)} is not supported by this runner")
        out[vol["name"]] = d
    return out


def _project(cluster: KubeCluster, pod: Mapping[str, Any], volume: str, d: Path, source: Mapping[str, Any]) -> None:
    """One source of a projected volume (or a whole downwardAPI / configMap volume) into ``d``."""
    namespace = str(pod["metadata"]["namespace"])
    if "serviceAccountToken" in source:
        _write(d / source["serviceAccountToken"]["path"], _token(cluster, pod, source["serviceAccountToken"]))
    elif "downwardAPI" in source:
        for item in source["downwardAPI"]["items"]:
            _write(d / item["path"], field(pod, item["fieldRef"]["fieldPath"]))
    elif "configMap" in source:
        ref = source["configMap"]
        data = cluster.api.get(f"/api/v1/namespaces/{namespace}/configmaps/{ref['name']}")["data"]
        items = ref.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            _write(d / item["path"], data[item["key"]])
    else:
        raise PodSpecError(f"volume {volume}: {sorted(source)} is not supported by this runner")


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, 0o644)  # a projected or downward-API volume's defaultMode


def _token(cluster: KubeCluster, pod: Mapping[str, Any], source: Mapping[str, Any]) -> str:
    meta = pod["metadata"]
    sa = pod["spec"].get("serviceAccountName", "default")
    spec: dict[str, Any] = {"audiences": [source["audience"]] if source.get("audience") else [],
                            "expirationSeconds": int(source.get("expirationSeconds", 3600))}
    if meta.get("uid"):
        spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]}
    made = cluster.api.create(f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token",
                              {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
    return str(made["status"]["token"])


class PodRunner:
    """One pod's network namespace, volumes and processes."""

    def __init__(self, cluster: KubeCluster, pod: Mapping[str, Any], *, bridge: str, index: int, gateway: str,
                 prefixlen: int, workdir: Path, images: Mapping[str, Sequence[str]],
                 executables: Mapping[str, Sequence[str]], hosts: Mapping[str, str],
                 image_env: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.cluster = cluster
        self.pod = pod
        self.name = str(pod["metadata"]["name"])
        self.namespace = str(pod["metadata"]["namespace"])
        self.ip = str(pod["status"]["podIP"])
        self.images = images
        self.image_env = image_env or {}
        self.executables = executables
        self.dir = workdir / self.name
        self.dir.mkdir(parents=True)
        os.chmod(self.dir, 0o755)
        self.netns = f"tk-{uuid.uuid4().hex[:8]}"
        self.procs: dict[str, Proc] = {}
        self.hosts = self.dir / "hosts"
        self.hosts.write_text("127.0.0.1 localhost\n" + f"{self.ip} {self.name}\n"
                              + "".join(f"{ip} {name}\n" for name, ip in hosts.items()))
        os.chmod(self.hosts, 0o644)
        self._volumes = self._make_volumes()
        network.create_pod_netns(self.netns, f"{bridge}v{index}", bridge, self.ip, prefixlen, gateway)

    # ---- volumes ---------------------------------------------------------------------------------

    def _make_volumes(self) -> dict[str, Path]:
        return make_volumes(self.cluster, self.pod, self.dir / "volumes")

    # ---- containers ------------------------------------------------------------------------------
    # ---- containers ------------------------------------------------------------------------------

    def _user(self, container: Mapping[str, Any]) -> tuple[int, int]:
        pod_sc = self.pod["spec"].get("securityContext") or {}
        sc = container.get("securityContext") or {}
        uid = sc.get("runAsUser", pod_sc.get("runAsUser", 0))
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", uid))
        return int(uid), int(gid)

    def _argv(self, container: Mapping[str, Any]) -> list[str]:
        image = str(container["image"])
        if image not in self.images and "@" not in image:
            image = image.rsplit(":", 1)[0]  # a mapping for the name, whatever the tag
        if container.get("command"):
            command = list(container["command"])
            argv = [*self._exe(container, command[0], "command"), *command[1:]]
        elif image in self.images:
            argv = list(self.images[image])
        else:
            raise PodSpecError(f"container {container['name']}: image {container['image']!r} is not known to "
                               "this runner")
        return argv + list(container.get("args") or ())

    def _exe(self, container: Mapping[str, Any], name: str, what: str) -> Sequence[str]:
        """The host command for executable ``name`` of the container's image ("IMAGE NAME" first, then NAME)."""
        for key in (f"{container['image']} {name}", name):
            if key in self.executables:
                return self.executables[key]
        raise PodSpecError(f"container {container['name']}: {what} runs {name!r}, unknown to this runner")

    def _exec_spec(self, container: Mapping[str, Any], argv: Sequence[str]) -> list[str]:
        image = str(container["image"])
        # The image's ENV first (by tag, else by name), then the container's env over it.
        base = self.image_env.get(image) or self.image_env.get(image.rsplit(":", 1)[0]) or {}
        env = {**base, **container_env(self.pod, container)}
        argv = [expand(a, env) for a in argv]
        mounts = []
        for m in container.get("volumeMounts") or ():
            if m["name"] not in self._volumes:
                raise PodSpecError(f"container {container['name']}: volumeMount {m['name']}: no such volume")
            mounts.append([str(self._volumes[m["name"]]), m["mountPath"]])
        uid, gid = self._user(container)
        spec = self.dir / f"{container['name']}-{uuid.uuid4().hex[:6]}.json"
        caps = ((container.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
        spec.write_text(json.dumps({"mounts": mounts, "hosts": str(self.hosts), "uid": uid, "gid": gid,
                                    "caps": [c.lower().removeprefix("cap_") for c in caps],
                                    "env": env, "argv": argv}))
        python = self.executables.get("python", ["python3"])[0]
        return ["unshare", "--mount", "--propagation", "private", python, "-m", "tether.testing.podexec", str(spec)]

    def _run_to_completion(self, container: Mapping[str, Any], argv: Sequence[str], what: str,
                           timeout: float = 150.0) -> None:
        command = self._exec_spec(container, argv)
        r = subprocess.run(network.netns_exec(self.netns, command), capture_output=True, text=True, timeout=timeout,
                           check=False)
        if r.returncode != 0:
            raise RuntimeError(f"pod {self.name}: {what} exited {r.returncode}: {(r.stdout + r.stderr)[-2000:]}\n"
                               f"(container spec: {Path(command[-1]).read_text()})")

    def _start(self, container: Mapping[str, Any]) -> Proc:
        name = container["name"]
        proc = Proc(self._exec_spec(container, self._argv(container)), self.dir / f"{name}.log", netns=self.netns)
        self.procs[name] = proc
        return proc

    def probe_ok(self, container: Mapping[str, Any], kind: str = "readinessProbe") -> bool:
        probe = container.get(kind)
        if probe is None:
            return True
        if "httpGet" not in probe:
            raise PodSpecError(f"container {container['name']}: {kind}: only httpGet is supported by this runner")
        get = probe["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in container.get("ports") or () if p.get("name") == port)
        try:
            return http_get(f"http://{self.ip}:{port}{get.get('path', '/')}", timeout=1)[0] == 200
        except OSError:
            return False

    def _wait_probe(self, container: Mapping[str, Any], kind: str, timeout: float) -> None:
        proc = self.procs[container["name"]]

        def ok() -> bool:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"pod {self.name}: container {container['name']} exited:\n{proc.log()[-3000:]}")
            return self.probe_ok(container, kind)

        wait_until(ok, timeout=timeout, what=f"pod {self.name}: {container['name']}'s {kind}")

    def _post_start(self, container: Mapping[str, Any]) -> None:
        hook = ((container.get("lifecycle") or {}).get("postStart") or {})
        if not hook:
            return
        if "exec" not in hook:
            raise PodSpecError(f"container {container['name']}: postStart: only exec hooks are supported")
        command = list(hook["exec"]["command"])
        self._run_to_completion(container, [*self._exe(container, command[0], "postStart"), *command[1:]],
                                f"{container['name']}'s postStart hook")

    def start(self, timeout: float = 120.0) -> PodRunner:
        """Init containers, then containers, in the kubelet's order; returns once every container is ready."""
        spec = self.pod["spec"]
        for c in spec.get("initContainers") or ():
            if c.get("restartPolicy") == "Always":  # a native sidecar
                self._start(c)
                self._wait_probe(c, "startupProbe", timeout)
                self._post_start(c)
            else:
                self._run_to_completion(c, self._argv(c), f"init container {c['name']}")
        for c in spec["containers"]:
            self._start(c)
            self._post_start(c)
        for c in [*(x for x in spec.get("initContainers") or () if x.get("restartPolicy") == "Always"),
                  *spec["containers"]]:
            self._wait_probe(c, "readinessProbe", timeout)
        return self

    def exec(self, *argv: str, timeout: float = 60.0) -> str:
        """A command in the pod's network namespace as root (``kubectl exec`` of a debug container)."""
        r = subprocess.run(network.netns_exec(self.netns, list(argv)), capture_output=True, text=True,
                           timeout=timeout, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{self.name}: {' '.join(argv)}: {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{p.log()[-3000:]}" for name, p in self.procs.items())

    def close(self) -> None:
        for p in reversed(list(self.procs.values())):
            p.stop()
        network.delete_pod_netns(self.netns)
        shutil.rmtree(self.dir, ignore_errors=True)
