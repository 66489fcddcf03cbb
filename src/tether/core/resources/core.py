"""The core objects the mesh reads: Namespace, Service, and the workloads behind services."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from tether.core.resources.base import IP, DnsLabel, Port, PortOrName, Resource, Strict, check_ip


class NamespaceSpec(Strict):
    finalizers: list[str] = Field(default_factory=list)


class Namespace(Resource):
    GROUP: ClassVar[str] = ""
    KIND: ClassVar[str] = "Namespace"
    VERSIONS: ClassVar[dict[str, str | None]] = {"v1": None}
    NAMESPACED: ClassVar[bool] = False

    spec: NamespaceSpec | None = None


class ServicePort(Strict):
    name: str | None = None
    port: Port
    target_port: PortOrName | None = None
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    app_protocol: str | None = None
    node_port: int | None = None

    @property
    def target(self) -> int | str:
        return self.target_port if self.target_port is not None else self.port


class ServiceSpec(Strict):
    selector: dict[str, str] | None = None
    ports: list[ServicePort] = Field(default_factory=list)
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    cluster_ip: str | None = Field(default=None, alias="clusterIP")
    cluster_ips: list[str] = Field(default_factory=list, alias="clusterIPs")
    external_name: str | None = None
    ip_families: list[str] = Field(default_factory=list)
    ip_family_policy: str | None = None
    session_affinity: str | None = None
    external_traffic_policy: str | None = None
    internal_traffic_policy: str | None = None
    publish_not_ready_addresses: bool | None = None
    load_balancer_ip: str | None = Field(default=None, alias="loadBalancerIP")

    @model_validator(mode="after")
    def _ports(self) -> ServiceSpec:
        seen: set[tuple[int, str]] = set()
        for p in self.ports:
            if (p.port, p.protocol) in seen:
                raise ValueError(f"ports: port {p.port}/{p.protocol} is listed twice")
            seen.add((p.port, p.protocol))
        if len(self.ports) > 1 and any(not p.name for p in self.ports):
            raise ValueError("ports: every port needs a name when there is more than one")
        if self.cluster_ip not in (None, "", "None"):
            check_ip(self.cluster_ip)
        return self


class Service(Resource):
    GROUP: ClassVar[str] = ""
    KIND: ClassVar[str] = "Service"
    VERSIONS: ClassVar[dict[str, str | None]] = {"v1": None}

    spec: ServiceSpec = Field(default_factory=ServiceSpec)


class WorkloadPort(Strict):
    name: str | None = None
    port: Port
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"


class WorkloadProbe(Strict):
    """An HTTP health check of the workload (a Pod's httpGet liveness/readiness/startup probe)."""

    port: Port | str  # a number or the name of one of the workload's ports
    path: str = Field(default="/", pattern=r"^/")


class WorkloadSpec(Strict):
    service_account: DnsLabel = "default"
    addresses: list[IP] = Field(default_factory=list)
    ports: list[WorkloadPort] = Field(default_factory=list)
    # Linkerd authorizes these paths from the probe networks on ports without their own routes.
    probes: list[WorkloadProbe] = Field(default_factory=list)
    ready: bool = True
    # The proxy's inbound port, when it is not the default 4143 (local workloads run several on one host).
    proxy_inbound_port: Port | None = None
    # Whether a proxy runs beside it: only then do clients get its identity and speak mTLS to it (a
    # Kubernetes pod without the linkerd-proxy container is not meshed; every local workload is).
    meshed: bool = True


class Workload(Resource):
    """A running workload (a Kubernetes Pod, or a local workload from the registry), as the mesh sees it."""

    GROUP: ClassVar[str] = "workload.tether.io"
    KIND: ClassVar[str] = "Workload"
    VERSIONS: ClassVar[dict[str, str | None]] = {"workload.tether.io/v1alpha1": None}

    spec: WorkloadSpec


class ExternalWorkloadMeshTLS(Strict):
    identity: str = Field(min_length=1)
    server_name: str = Field(min_length=1)


class ExternalWorkloadPort(Strict):
    name: str | None = None
    port: Port
    protocol: Literal["TCP"] = "TCP"


class WorkloadIP(Strict):
    ip: IP


class ExternalWorkloadSpec(Strict):
    mesh_tls: ExternalWorkloadMeshTLS = Field(alias="meshTLS")
    ports: list[ExternalWorkloadPort] = Field(default_factory=list)
    workload_ips: list[WorkloadIP] = Field(default_factory=list, alias="workloadIPs")

    @model_validator(mode="after")
    def _one_ip(self) -> ExternalWorkloadSpec:
        if len(self.workload_ips) > 1:
            raise ValueError("workloadIPs: at most one address (as Linkerd)")
        return self


class ExternalWorkload(Resource):
    GROUP: ClassVar[str] = "workload.linkerd.io"
    KIND: ClassVar[str] = "ExternalWorkload"
    VERSIONS: ClassVar[dict[str, str | None]] = {
        "workload.linkerd.io/v1beta1": None,
        "workload.linkerd.io/v1alpha1": None,
    }

    spec: ExternalWorkloadSpec
