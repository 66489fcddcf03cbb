"""The image the chart deploys, built by scripts/image/build.sh with Debian's buildah from Debian's packages,
then run: its `tether`, its compiled hot path, proxy-init as the chart runs it (uid 65534 with only
NET_ADMIN and NET_RAW added, root file system read-only) writing real iptables rules in a network
namespace, and the proxy as uid 2102 serving there.

Containers run with buildah's chroot isolation (this machine's crun cannot use its cgroups); the
network namespace is the test's own, entered before buildah starts the container.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.core.sidecar import IMAGE_PYTHON, python_argv
from tether.platform.local import network
from tether.testing import netns
from tether.testing.kubecluster import wait_until
from tether.testing.procs import Proc

pytestmark = [pytest.mark.integration, pytest.mark.netns, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
TAG = "localhost/tether:test"


@pytest.fixture(scope="module")
def container() -> Iterator[str]:
    if shutil.which("buildah") is None:
        pytest.fail("buildah is not installed: scripts/setup installs it")
    # A first build runs debootstrap and compiles the hot path (minutes); later ones reuse the cached layers.
    build = subprocess.run([str(ROOT / "scripts" / "image" / "build.sh"), TAG], capture_output=True, text=True,
                           timeout=2000)
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
    ctr = subprocess.run(["buildah", "from", TAG], capture_output=True, text=True, check=True).stdout.strip()
    yield ctr
    subprocess.run(["buildah", "rm", ctr], capture_output=True, check=False)


def run(ctr: str, *argv: str, user: str = "", caps: str = "", ns: str = "") -> subprocess.CompletedProcess[str]:
    cmd = ["buildah", "run", "--isolation", "chroot"]
    if user:
        cmd += ["--user", user]
    if caps:
        cmd += ["--cap-drop", "all", "--cap-add", caps]
    cmd += [ctr, "--", *argv]
    if ns:
        cmd = network.netns_exec(ns, cmd)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_image_runs_tether_with_the_compiled_hot_path(container: str) -> None:
    version = run(container, "tether", "version", "--client")
    assert version.returncode == 0 and version.stdout.startswith("Client version: "), version.stderr
    native = run(container, "python", "-c", "import tether.native as n, tether.proxy.app; "
                 "print(n.check(), len(n.loaded_compiled()))")
    assert native.returncode == 0, native.stderr
    state, count = native.stdout.split()
    assert state == "compiled" and int(count) > 10, native.stdout
    # Bytecode ships in the image: the proxy (uid 2102, which cannot write beside the sources) compiles
    # nothing when it starts.
    pyc = run(container, "python", "-c", "import importlib.util, os, tether.proxy.app as a; "
              "print(os.path.exists(importlib.util.cache_from_source(a.__file__)))", user="2102")
    assert pyc.stdout.strip() == "True", pyc.stdout + pyc.stderr
    # The chart's users exist, and iptables carries the file capabilities proxy-init needs as a non-root user.
    assert "uid=2102(tether-proxy)" in run(container, "id", user="2102").stdout
    assert "cap_net_admin,cap_net_raw=ep" in run(container, "getcap", "/usr/sbin/xtables-legacy-multi").stdout


@pytest.fixture
def pod_netns() -> Iterator[str]:
    why = netns.available()
    if why is not None:
        pytest.skip(f"a network namespace: {why}")
    name = f"timg-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture(scope="module")
def rootfs(container: str) -> Iterator[str]:
    path = subprocess.run(["buildah", "mount", container], capture_output=True, text=True, check=True).stdout.strip()
    yield path
    subprocess.run(["buildah", "umount", container], capture_output=True, check=False)


def as_kubernetes_runs(rootfs: str, ns: str, uid: int, caps: tuple[str, ...], argv: list[str]) -> list[str]:
    """A container process under the rules runc applies for a pod's securityContext with runAsUser,
    capabilities.add and allowPrivilegeEscalation: false: the bounding and inheritable sets are the
    added capabilities, no ambient set, no_new_privs. Across its exec a non-root process then keeps a
    capability only if the file it runs carries it. In a private mount namespace: /proc, /dev, and a
    fresh /run (the injected init container's emptyDir there)."""
    wanted = "".join(f",+{c}" for c in caps)
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", f"--bounding-set=-all{wanted}",
               f"--inh-caps=-all{wanted}", "--no-new-privs", "--"]
    inner = ["chroot", rootfs, "/usr/bin/env", "-i", f"PATH={IMAGE_PATH}", "HOME=/tmp", *setpriv, *argv]
    mounts = (f"mount -t tmpfs -o mode=0777 tmpfs {rootfs}/run && mount -t proc proc {rootfs}/proc && "
              f"mount --rbind /dev {rootfs}/dev && exec \"$@\"")
    return network.netns_exec(ns, ["unshare", "--mount", "--propagation", "private", "sh", "-c", mounts, "sh",
                                   *inner])


IMAGE_PATH = "/opt/tether/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INIT_ARGS = ["--incoming-proxy-port", "4143", "--outgoing-proxy-port", "4140", "--proxy-uid", "2102",
             "--inbound-ports-to-ignore", "4190,4191", "--iptables-mode", "legacy"]


def test_proxy_init_as_kubernetes_runs_the_injected_init_container(rootfs: str, pod_netns: str) -> None:
    from tether.core.inject.pod import INIT_COMMAND

    caps = ("net_admin", "net_raw")
    init = subprocess.run(as_kubernetes_runs(rootfs, pod_netns, 65534, caps, [INIT_COMMAND, *INIT_ARGS]),
                          capture_output=True, text=True, timeout=120, check=False)
    assert init.returncode == 0, init.stdout + init.stderr
    rules = subprocess.run(network.netns_exec(pod_netns, ["iptables-legacy-save", "-t", "nat"]), capture_output=True,
                           text=True, check=True).stdout
    assert "--to-ports 4143" in rules and "--to-ports 4140" in rules and "--uid-owner 2102" in rules, rules


def test_without_the_launcher_or_the_capabilities_proxy_init_is_refused(rootfs: str, pod_netns: str) -> None:
    """What the launcher is for: the plain `tether proxy-init` (an interpreter without file capabilities)
    loses the added capabilities at its exec, and the launcher without them added gains nothing."""
    for caps, argv, why in (
        (("net_admin", "net_raw"), ["tether", "proxy-init", *INIT_ARGS], "you must be root"),
        # The kernel refuses to exec a file whose capabilities the bounding set does not allow.
        ((), ["tether-proxy-init", *INIT_ARGS], "Operation not permitted"),
    ):
        run_ = subprocess.run(as_kubernetes_runs(rootfs, pod_netns, 65534, caps, argv), capture_output=True,
                              text=True, timeout=120, check=False)
        assert run_.returncode != 0 and why in run_.stderr, (caps, argv, run_.stdout, run_.stderr)
    rules = subprocess.run(network.netns_exec(pod_netns, ["iptables-legacy-save", "-t", "nat"]), capture_output=True,
                           text=True, check=True).stdout
    assert "PROXY_INIT" not in rules, rules


def test_the_image_s_proxy_serves_as_uid_2102(rootfs: str, pod_netns: str, tmp_path: Path) -> None:
    # The injected container's command (python -OO -X no_debug_ranges -m tether) and args.
    command = [*python_argv(IMAGE_PYTHON), "proxy"]
    # Its level-2 bytecode is in the image (the proxy's user cannot write it): tether's, the venv's, Python's.
    for module in ("opt/tether/src/tether/proxy/__pycache__/app", "usr/lib/python3.11/asyncio/__pycache__/events"):
        assert Path(rootfs, f"{module}.cpython-311.opt-2.pyc").is_file(), module
    assert list(Path(rootfs, "opt/tether/venv/lib").glob("python3.11/site-packages/uvloop/__pycache__/*.opt-2.pyc"))
    proxy = Proc(as_kubernetes_runs(rootfs, pod_netns, 2102, (), [
        *command, "--inbound-addr", "0.0.0.0:4143", "--outbound-addr", "127.0.0.1:4140",
        "--admin-addr", "127.0.0.1:4191"]), tmp_path / "proxy.log")
    try:
        def ready() -> bool:
            if proxy.popen.poll() is not None:
                raise AssertionError(f"the proxy exited:\n{proxy.log()[-3000:]}")
            r = subprocess.run(network.netns_exec(pod_netns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                                              "http://127.0.0.1:4191/ready"]),
                               capture_output=True, text=True, check=False)
            return r.stdout == "200"

        wait_until(ready, timeout=60, what="the image's proxy ready")
        # exec all the way down: the process started is the proxy, as uid 2102, compiled hot path loaded.
        status = Path(f"/proc/{proxy.pid}/status").read_text()
        assert next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1] == "2102", status
        maps = Path(f"/proc/{proxy.pid}/maps").read_text()
        assert "tether_native__mypyc" in maps
        metrics = subprocess.run(network.netns_exec(pod_netns, ["curl", "-s", "http://127.0.0.1:4191/metrics"]),
                                 capture_output=True, text=True, check=True).stdout
        assert 'python_optimize="2"' in metrics and 'python_debug_ranges="false"' in metrics, metrics[:2000]
    finally:
        proxy.stop()
