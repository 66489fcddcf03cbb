"""Where a local mesh keeps its state, and the settings `tether up` fixed for it (``mesh.json``).

Layout under a state directory::

    mesh.json                 this file's MeshSettings: network, addresses, identity files
    supervisor.pid            the supervisor's pid while it runs
    supervisor.log            its log (and its control-plane children's lines go to logs/control-plane/)
    status.json               what the supervisor last saw: components and pods (rewritten on change)
    specs/<ns>/<name>.yaml    desired workloads (`tether run` writes, `scale`/`rm` edit)
    services.json             virtual IPs given to Services, kept stable by namespace/name
    resources/                the local store (`tether apply -f`)
    workloads/ tokens/        the workload registry (one entry per pod)
    ca/                       a trust anchor and issuer made by `tether up` when none was given
    logs/<ns>/<pod>/{app,proxy}.log
    addons/<name>.json        extra children to supervise (an extension's server, e.g. `tether viz install`)
    scrape/{proxies,controllers}.json  scrape targets (file_sd form) for the pods' proxies and the control plane

Files a pod's proxy (uid 2102) reads live in a runtime directory under /run, because a state
directory inside a private home is not traversable by that uid.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROXY_UID = 2102
RUNTIME_ROOT = Path("/run/tether")


class LayoutError(ValueError):
    """A state directory's files are missing or unreadable; the message names the file."""


@dataclass(frozen=True)
class MeshSettings:
    mesh_id: str
    bridge: str
    pod_cidr: str
    service_cidr: str
    ha: bool = False
    controller_namespace: str = "linkerd"
    trust_domain: str = "cluster.local"
    cluster_domain: str = "cluster.local"
    trust_anchors: str = ""
    issuer_certificate: str = ""
    issuer_key: str = ""
    generated_ca: bool = False
    created_state_dir: bool = False
    # Entries of the state directory `tether up` created, which `tether down` removes.
    made: list[str] = field(default_factory=list)
    # No bridge, no network namespaces (started without root): only --explicit workloads, control
    # plane on 127.0.0.1.
    explicit_only: bool = False
    # Loopback addresses of --explicit pods: two per pod (its proxy's, its application's).
    loopback_cidr: str = ""
    # The first host: where its join API listens. A joined host (agent): the first host's join API.
    join_addr: str = ""
    agent: bool = False
    # component -> list of "host:port" (gRPC) and admin "host:port", fixed when the mesh is first started
    identity_addrs: list[str] = field(default_factory=list)
    identity_admin_addrs: list[str] = field(default_factory=list)
    destination_addrs: list[str] = field(default_factory=list)
    destination_admin_addrs: list[str] = field(default_factory=list)
    # The destination replicas serve mutual TLS on destination_addrs (proxies present their certificate
    # and require the service's) and plaintext here, on loopback, for the supervisor and the CLI.
    destination_local_addrs: list[str] = field(default_factory=list)

    @property
    def replicas(self) -> int:
        return 3 if self.ha else 1

    @property
    def gateway(self) -> str:
        """The bridge's own address: the control plane listens here, pods route through it."""
        if self.explicit_only:
            return "127.0.0.1"
        return str(next(ipaddress.ip_network(self.pod_cidr).hosts()))

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.pod_cidr).prefixlen

    @property
    def netns_prefix(self) -> str:
        return f"tether-{self.mesh_id}-"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> MeshSettings:
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError as e:
            raise LayoutError(f"{source}: not a mesh settings file ({e})") from None


def new_mesh_id() -> str:
    return secrets.token_hex(2)


def loopback_cidr(mesh_id: str) -> str:
    """A /16 of 127.0.0.0/8 for this mesh's --explicit pods (127.0.x.x and 127.255.x.x left alone)."""
    return f"127.{int(mesh_id, 16) % 253 + 1}.0.0/16"


class Layout:
    """Paths of one local mesh's state directory."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir).absolute()

    @property
    def settings_path(self) -> Path:
        return self.root / "mesh.json"

    @property
    def pid_path(self) -> Path:
        return self.root / "supervisor.pid"

    @property
    def log_path(self) -> Path:
        return self.root / "supervisor.log"

    @property
    def status_path(self) -> Path:
        return self.root / "status.json"

    @property
    def specs_dir(self) -> Path:
        return self.root / "specs"

    @property
    def services_path(self) -> Path:
        return self.root / "services.json"

    @property
    def resources_dir(self) -> Path:
        return self.root / "resources"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def join_token_path(self) -> Path:
        return self.root / "join.token"

    @property
    def routes_path(self) -> Path:
        """Routes and the forwarding setting this host changed for joined hosts, undone by `down`."""
        return self.root / "routes.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def addons_dir(self) -> Path:
        """Extra children the supervisor runs beside the control plane (``<name>.json``: argv)."""
        return self.root / "addons"

    @property
    def scrape_dir(self) -> Path:
        """Scrape targets in Prometheus file_sd form, kept in step with the pods by the supervisor."""
        return self.root / "scrape"

    def pod_logs(self, namespace: str, pod: str) -> Path:
        return self.logs_dir / namespace / pod

    def runtime_dir(self, settings: MeshSettings) -> Path:
        # Without root, /run is not ours: the proxies run as the same user and read the state dir.
        return RUNTIME_ROOT / settings.mesh_id if os.geteuid() == 0 else self.root / "run"

    def read_settings(self) -> MeshSettings:
        try:
            doc = json.loads(self.settings_path.read_text())
        except FileNotFoundError:
            raise LayoutError(f"{self.settings_path}: no mesh here (run `tether up --state-dir {self.root}`)") from None
        except (OSError, ValueError) as e:
            raise LayoutError(f"{self.settings_path}: cannot read: {e}") from None
        if not isinstance(doc, dict):
            raise LayoutError(f"{self.settings_path}: not a JSON object")
        return MeshSettings.from_dict(doc, str(self.settings_path))

    def write_settings(self, settings: MeshSettings) -> None:
        write_json(self.settings_path, settings.to_dict())

    def supervisor_pid(self) -> int | None:
        """The running supervisor's pid, or None (no pid file, or its process is gone)."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def read_status(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not reaped) is not running.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def write_json(path: Path, doc: Any) -> None:
    """Atomically (rename), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
