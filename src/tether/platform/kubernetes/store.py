"""The Kubernetes store: the mesh's resources as the API server has them, behind the same Store interface.

One :class:`~tether.platform.kubernetes.informer.Informer` per API resource follows the server (list,
then watch with bookmarks; re-list on 410 Gone; back-off on errors) into the same watched per-kind
states the local store publishes, so the destination and policy services above are unchanged:

* Namespaces, Services and the mesh's CRDs become the same models ``tether apply`` decodes (an
  object the models refuse is logged, listed in ``source_errors()`` and its last good version kept);
* Pods become ``Workload`` objects; a pod is ready (an endpoint of the Services that select it) when
  an EndpointSlice lists it as ready: the EndpointSlice controller's verdict, as Linkerd's
  destination reads it (so publishNotReadyAddresses and terminating endpoints follow Kubernetes). A
  pod no slice lists is an endpoint of nothing;
* HTTPRoute is served from policy.linkerd.io and gateway.networking.k8s.io; when both groups have
  a route of the same namespace/name, policy.linkerd.io's is used and the clash is reported.

A CRD that is not installed is an empty kind (reported in ``source_errors()``) and is looked for
again with back-off, so installing the CRDs later needs no restart.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tether.control.store import KindStates
from tether.core.resources import KINDS, Loaded, Resource
from tether.core.resources.events import Key, KindState, ResourceEvent, SourceError, apply_event
from tether.platform.kubernetes import convert
from tether.platform.kubernetes.client import ApiResource, KubeClient, KubeError
from tether.platform.kubernetes.informer import Backoff, Informer, InformerSettings
from tether.runtime.watch import Watched

log = logging.getLogger("tether.store")

DEFAULT_QUEUE_LIMIT = 100_000
MAX_LOGGED_NOTICES = 10_000

NAMESPACES = ApiResource("", "v1", "namespaces", "Namespace", namespaced=False)
SERVICES = ApiResource("", "v1", "services", "Service")
PODS = ApiResource("", "v1", "pods", "Pod")
ENDPOINT_SLICES = ApiResource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")


@dataclass(frozen=True, slots=True)
class CustomKind:
    """A CRD the mesh reads: its group, plural, kind, and the versions to try (preferred first)."""

    group: str
    plural: str
    kind: str
    versions: tuple[str, ...]

    def at(self, version: str) -> ApiResource:
        return ApiResource(self.group, version, self.plural, self.kind)

    def __str__(self) -> str:
        return f"{self.plural}.{self.group}"


# Every CRD the mesh reads, with the versions Linkerd serves (newest first).
CUSTOM_KINDS: tuple[CustomKind, ...] = (
    CustomKind("linkerd.io", "serviceprofiles", "ServiceProfile", ("v1alpha2",)),
    CustomKind("policy.linkerd.io", "httproutes", "HTTPRoute", ("v1beta3", "v1beta2", "v1beta1")),
    CustomKind("gateway.networking.k8s.io", "httproutes", "HTTPRoute", ("v1", "v1beta1")),
    CustomKind("gateway.networking.k8s.io", "grpcroutes", "GRPCRoute", ("v1", "v1alpha2")),
    CustomKind("gateway.networking.k8s.io", "tcproutes", "TCPRoute", ("v1alpha2",)),
    CustomKind("split.smi-spec.io", "trafficsplits", "TrafficSplit", ("v1alpha2", "v1alpha1")),
    CustomKind("policy.linkerd.io", "servers", "Server", ("v1beta3", "v1beta2", "v1beta1")),
    CustomKind("policy.linkerd.io", "serverauthorizations", "ServerAuthorization", ("v1beta1",)),
    CustomKind("policy.linkerd.io", "authorizationpolicies", "AuthorizationPolicy", ("v1alpha1",)),
    CustomKind("policy.linkerd.io", "meshtlsauthentications", "MeshTLSAuthentication", ("v1alpha1",)),
    CustomKind("policy.linkerd.io", "networkauthentications", "NetworkAuthentication", ("v1alpha1",)),
    CustomKind("policy.linkerd.io", "httplocalratelimitpolicies", "HTTPLocalRateLimitPolicy", ("v1alpha1",)),
    CustomKind("policy.linkerd.io", "egressnetworks", "EgressNetwork", ("v1alpha1",)),
    CustomKind("workload.linkerd.io", "externalworkloads", "ExternalWorkload", ("v1beta1", "v1alpha1")),
)


class _Callbacks:
    """An informer handler made of two functions."""

    def __init__(self, replace: Callable[[Sequence[Mapping[str, Any]]], None],
                 event: Callable[[str, Mapping[str, Any]], None]) -> None:
        self.replace = replace
        self.event = event


@dataclass
class KubeStoreMetrics:
    events_total: dict[str, int] = field(default_factory=dict)
    refused_total: int = 0


class KubeStore(KindStates):
    """A :class:`tether.control.store.Store` over a Kubernetes API server."""

    def __init__(
        self,
        client: KubeClient,
        *,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        settings: InformerSettings | None = None,
        custom_kinds: Sequence[CustomKind] = CUSTOM_KINDS,
    ) -> None:
        self.client = client
        self.settings = settings or InformerSettings()
        self.metrics = KubeStoreMetrics()
        self._kinds: dict[str, Watched[KindState, ResourceEvent]] = {
            kind: Watched({}, apply_event, queue_limit=queue_limit) for kind in KINDS
        }
        # Per source (an informer's resource), the converted objects it holds now.
        self._sources: dict[str, dict[Key, Resource]] = {}
        # Source errors: (source, namespace/name) -> message; the object's last good version is kept.
        self._refused: dict[tuple[str, Key], str] = {}
        self._missing: dict[str, str] = {}  # CRDs not served -> why
        self._notices: set[str] = set()  # notices already logged, so a resync does not repeat them
        # Pods as workloads (their readiness follows the EndpointSlices).
        self._pods: dict[Key, Resource] = {}
        # EndpointSlices: slice key -> pods it lists (-> ready); and pod -> the slices listing it.
        self._slices: dict[Key, Mapping[Key, bool]] = {}
        self._slices_of_pod: dict[Key, set[Key]] = {}
        self._custom = tuple(custom_kinds)
        # kind -> the sources that feed it, by precedence
        self._kind_sources: dict[str, list[str]] = {"Namespace": [str(NAMESPACES)], "Service": [str(SERVICES)]}
        for ck in self._custom:
            self._kind_sources.setdefault(ck.kind, []).append(str(ck))
        self.informers: dict[str, Informer] = {}
        self._core = (
            Informer(client, NAMESPACES,
                     _Callbacks(self._source_replace(str(NAMESPACES), convert.namespace, "Namespace"),
                                self._source_event(str(NAMESPACES), convert.namespace, "Namespace")),
                     settings=self.settings),
            Informer(client, SERVICES,
                     _Callbacks(self._source_replace(str(SERVICES), convert.service, "Service"),
                                self._source_event(str(SERVICES), convert.service, "Service")),
                     settings=self.settings),
            Informer(client, ENDPOINT_SLICES, _Callbacks(self._slices_replace, self._slice_event),
                     settings=self.settings),
            Informer(client, PODS, _Callbacks(self._pods_replace, self._pod_event), settings=self.settings),
        )
        for inf in self._core:
            self.informers[str(inf.resource)] = inf
        self._running = False

    # --- the Store interface (list, get, watch, version: KindStates) ------------------------------

    def source_errors(self) -> Sequence[SourceError]:
        out = [SourceError(f"{src} {ns + '/' if ns else ''}{name}", (msg,))
               for (src, (ns, name)), msg in sorted(self._refused.items())]
        out += [SourceError(src, (why,)) for src, why in sorted(self._missing.items())]
        return out

    # --- publishing ------------------------------------------------------------------------------

    def _publish(self, kind: str, key: Key, value: Resource | None) -> None:
        watched = self._kinds[kind]
        before = watched.state.get(key)
        if value is None:
            if before is None:
                return
            ev = ResourceEvent("DELETED", before)
        elif before is None:
            ev = ResourceEvent("ADDED", value)
        elif before == value:
            return
        else:
            ev = ResourceEvent("MODIFIED", value)
        watched.change(ev)
        self.metrics.events_total[ev.type] = self.metrics.events_total.get(ev.type, 0) + 1

    def _effective(self, kind: str, key: Key) -> Resource | None:
        sources = self._kind_sources[kind]
        found = [self._sources.get(s, {}).get(key) for s in sources]
        present = [(s, r) for s, r in zip(sources, found, strict=True) if r is not None]
        clash = f"{kind} (two groups)"
        if len(present) > 1:
            self._refused[(clash, key)] = (
                f"{kind} {key[0]}/{key[1]} exists in {' and '.join(s for s, _ in present)}; "
                f"the one in {present[0][0]} is used"
            )
        else:
            self._refused.pop((clash, key), None)
        return present[0][1] if present else None

    # --- sources that map one object to one resource ------------------------------------------------

    def _convert(self, source: str, fn: Callable[[Mapping[str, Any]], Resource | Loaded | builtins.list[Any]],
                 obj: Mapping[str, Any]) -> Resource | None:
        key = convert.key_of(obj)
        try:
            out = fn(obj)
        except convert.ConversionError as e:
            self._refuse(source, key, str(e))
            return None
        if isinstance(out, list):
            self._refuse(source, key, "; ".join(str(e) for e in out))
            return None
        self._refused.pop((source, key), None)
        if isinstance(out, Loaded):
            for n in out.notices:  # a seed's field real Linkerd lacks, applied with a notice
                if n not in self._notices:
                    if len(self._notices) >= MAX_LOGGED_NOTICES:
                        self._notices.clear()  # bounded: at worst a notice is logged again
                    self._notices.add(n)
                    log.warning("notice: %s", n)
            return convert.strip_status(out.resource)
        return convert.strip_status(out)

    def _refuse(self, source: str, key: Key, message: str) -> None:
        if self._refused.get((source, key)) != message:
            self.metrics.refused_total += 1
            log.error("%s (keeping its last good version)", message)
        self._refused[(source, key)] = message

    def _source_replace(self, source: str, fn: Callable[[Mapping[str, Any]], Any],
                        k: str) -> Callable[[Sequence[Mapping[str, Any]]], None]:
        def replace(items: Sequence[Mapping[str, Any]]) -> None:
            old = self._sources.get(source, {})
            new: dict[Key, Resource] = {}
            for obj in items:
                key = convert.key_of(obj)
                res = self._convert(source, fn, obj)
                if res is None:
                    if key in old:
                        new[key] = old[key]  # invalid now: its last good version stays
                    continue
                new[key] = res
            for key in set(self._refused_keys(source)) - {convert.key_of(o) for o in items}:
                self._refused.pop((source, key), None)
            self._sources[source] = new
            for key in sorted(old.keys() | new.keys()):
                self._publish(k, key, self._effective(k, key))
        return replace

    def _refused_keys(self, source: str) -> builtins.list[Key]:
        return [key for (src, key) in self._refused if src == source]

    def _source_event(self, source: str, fn: Callable[[Mapping[str, Any]], Any],
                      k: str) -> Callable[[str, Mapping[str, Any]], None]:
        def event(type_: str, obj: Mapping[str, Any]) -> None:
            key = convert.key_of(obj)
            objects = self._sources.setdefault(source, {})
            if type_ == "DELETED":
                objects.pop(key, None)
                self._refused.pop((source, key), None)
            else:
                res = self._convert(source, fn, obj)
                if res is not None:
                    objects[key] = res
            self._publish(k, key, self._effective(k, key))
        return event

    # --- pods and EndpointSlices ----------------------------------------------------------------

    def _pod_is_ready(self, key: Key) -> bool:
        return any(self._slices[s].get(key, False) for s in self._slices_of_pod.get(key, ()))

    def _publish_pod(self, key: Key) -> None:
        entry = self._pods.get(key)
        if entry is None:
            self._publish("Workload", key, None)
            return
        workload = entry
        ready = self._pod_is_ready(key)
        if getattr(workload.spec, "ready", None) != ready:  # type: ignore[attr-defined]
            spec = workload.spec.model_copy(update={"ready": ready})  # type: ignore[attr-defined]
            workload = workload.model_copy(update={"spec": spec})
            self._pods[key] = workload
        self._publish("Workload", key, workload)

    def _pod_from(self, obj: Mapping[str, Any]) -> Resource | None:
        if convert.pod_gone(obj):
            return None
        key = convert.key_of(obj)
        try:
            w = convert.pod_workload(obj, self._pod_is_ready(key))
        except convert.ConversionError as e:
            self._refuse(str(PODS), key, str(e))
            return self._pods.get(key)
        self._refused.pop((str(PODS), key), None)
        return w

    def _pods_replace(self, items: Sequence[Mapping[str, Any]]) -> None:
        old = set(self._pods)
        self._pods = {}
        for obj in items:
            entry = self._pod_from(obj)
            if entry is not None:
                self._pods[convert.key_of(obj)] = entry
        for key in sorted(old | set(self._pods)):
            self._publish_pod(key)

    def _pod_event(self, type_: str, obj: Mapping[str, Any]) -> None:
        key = convert.key_of(obj)
        entry = None if type_ == "DELETED" else self._pod_from(obj)
        if entry is None:
            self._pods.pop(key, None)
            self._refused.pop((str(PODS), key), None)
        else:
            self._pods[key] = entry
        self._publish_pod(key)

    def _set_slice(self, key: Key, pods: Mapping[Key, bool] | None) -> set[Key]:
        """Record a slice's pods; the pods whose readiness may have changed."""
        old = self._slices.pop(key, {})
        for pod in old:
            listed = self._slices_of_pod.get(pod)
            if listed is not None:
                listed.discard(key)
                if not listed:
                    del self._slices_of_pod[pod]
        if pods is not None:
            self._slices[key] = pods
            for pod in pods:
                self._slices_of_pod.setdefault(pod, set()).add(key)
        return set(old) | set(pods or {})

    def _slices_replace(self, items: Sequence[Mapping[str, Any]]) -> None:
        touched: set[Key] = set()
        present = {convert.key_of(o) for o in items}
        for key in list(self._slices):
            if key not in present:
                touched |= self._set_slice(key, None)
        for obj in items:
            touched |= self._set_slice(convert.key_of(obj), convert.endpoint_slice(obj).pods)
        for pod in sorted(touched):
            self._publish_pod(pod)

    def _slice_event(self, type_: str, obj: Mapping[str, Any]) -> None:
        pods = None if type_ == "DELETED" else convert.endpoint_slice(obj).pods
        for pod in sorted(self._set_slice(convert.key_of(obj), pods)):
            self._publish_pod(pod)

    # --- running ---------------------------------------------------------------------------------

    async def _served_version(self, ck: CustomKind) -> str | None:
        """The first of the kind's versions the server serves, or None (KubeError when unreachable)."""
        try:
            group = await self.client.get(f"/apis/{ck.group}")
        except KubeError as e:
            if e.status == 404:
                return None
            raise
        served = {v.get("version") for v in group.get("versions") or []}
        for v in ck.versions:
            if v in served:
                try:
                    await self.client.get(ck.at(v).path(), limit="1")
                except KubeError as e:
                    if e.status == 404:
                        continue
                    raise
                return v
        return None

    def _custom_informer(self, ck: CustomKind, version: str) -> Informer:
        source = str(ck)
        handler = _Callbacks(
            self._source_replace(source, lambda o: convert.custom(o, f"kubernetes {source}"), ck.kind),
            self._source_event(source, lambda o: convert.custom(o, f"kubernetes {source}"), ck.kind),
        )
        inf = Informer(self.client, ck.at(version), handler, settings=self.settings)
        self.informers[source] = inf
        return inf

    async def _follow_custom(self, ck: CustomKind, stop: asyncio.Event) -> None:
        """Find a served version of the CRD (again and again, with back-off, while none is), then follow it."""
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        inf = self.informers.get(str(ck))
        while inf is None and not stop.is_set():
            try:
                version = await self._served_version(ck)
            except KubeError as e:
                version, why = None, str(e)
            else:
                why = (f"CRD {ck} is not installed (none of {', '.join(ck.versions)} is served): "
                       f"its {ck.kind} objects are not read; install the CRDs")
            if version is not None:
                self._missing.pop(str(ck), None)
                inf = self._custom_informer(ck, version)
                break
            self._missing[str(ck)] = why
            try:
                async with asyncio.timeout(backoff.next()):
                    await stop.wait()
            except TimeoutError:
                pass
        if inf is not None:
            await inf.run(stop)

    async def sync(self, timeout: float = 60.0) -> None:
        """List every resource once (before serving: a replica must not answer from an empty view).

        Raises KubeError when the API server cannot be read within ``timeout``; a CRD that is not
        installed is no error (it is looked for again while running)."""
        async with asyncio.timeout(timeout):
            for inf in self._core:
                await inf.list_once()
            for ck in self._custom:
                if str(ck) in self.informers:
                    continue
                version = await self._served_version(ck)
                if version is None:
                    self._missing[str(ck)] = (f"CRD {ck} is not installed (none of {', '.join(ck.versions)} "
                                              f"is served): its {ck.kind} objects are not read; install the CRDs")
                    continue
                await self._custom_informer(ck, version).list_once()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Follow every resource until ``stop`` is set (listing first what ``sync`` did not)."""
        stop = stop or asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            for inf in self._core:
                tg.create_task(inf.run(stop))
            for ck in self._custom:
                tg.create_task(self._follow_custom(ck, stop))

    def close(self) -> None:
        for w in self._kinds.values():
            w.close()

    def metrics_text(self) -> str:
        lines = [
            "# HELP store_resources Objects in the store by kind.",
            "# TYPE store_resources gauge",
        ]
        for kind, w in sorted(self._kinds.items()):
            lines.append(f'store_resources{{kind="{kind}"}} {len(w.state)}')
        lines += ["# HELP store_events_total Watch events published.", "# TYPE store_events_total counter"]
        for t, n in sorted(self.metrics.events_total.items()):
            lines.append(f'store_events_total{{type="{t}"}} {n}')
        lines += [
            "# HELP store_invalid_sources Objects currently refused or CRDs missing (last good version served).",
            "# TYPE store_invalid_sources gauge",
            f"store_invalid_sources {len(self.source_errors())}",
        ]
        for metric, help_, attr in (
            ("kube_store_lists_total", "Lists made per resource.", "lists"),
            ("kube_store_relists_gone_total", "Lists made again after a 410 Gone.", "relists_gone"),
            ("kube_store_watches_total", "Watch requests made per resource.", "watches"),
            ("kube_store_watch_events_total", "Watch events received per resource.", "events"),
            ("kube_store_bookmarks_total", "Bookmarks received per resource.", "bookmarks"),
            ("kube_store_errors_total", "Failed lists or watches per resource (then backed off).", "errors"),
        ):
            lines += [f"# HELP {metric} {help_}", f"# TYPE {metric} counter"]
            for name, inf in sorted(self.informers.items()):
                lines.append(f'{metric}{{resource="{name}"}} {getattr(inf.stats, attr)}')
        return "\n".join(lines) + "\n"
