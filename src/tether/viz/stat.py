"""The metrics API over Prometheus: stat, routes, edges and top, as rows of plain data.

A row's numbers come only from the queries in :mod:`tether.viz.queries`. Effective and actual:
a client proxy counts ``response_total`` once per request (what the application saw, after
retries) and ``route_actual_response_total`` once per try; ``actualRetries`` is the difference of
the route's actual count and the requests' count.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tether.viz import queries as q
from tether.viz.promapi import Prometheus, Sample

DEFAULT_ROUTE_NAME = "[DEFAULT]"


class StatError(ValueError):
    """A resource or flag viz cannot query; the message names it."""


@dataclass(frozen=True)
class Resource:
    type: str  # deployment | pod | namespace | service | authority
    name: str  # "" for every resource of the type
    namespace: str

    @staticmethod
    def parse(text: str, namespace: str, flag: str) -> Resource:
        """``deploy/web``, ``po/web-0``, ``svc/books``, ``ns/demo`` (or a bare type with no name)."""
        kind, _, name = text.partition("/")
        rtype = q.TYPE_ALIASES.get(kind.lower())
        if rtype is None:
            raise StatError(f"{flag}: unknown resource type {kind!r} (one of deploy, po, ns, svc, authority)")
        if rtype == "namespace" and name:
            return Resource(rtype, name, name)
        return Resource(rtype, name, namespace)

    def __str__(self) -> str:
        return f"{self.type}/{self.name}" if self.name else self.type


def window_seconds(window: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", window)
    if m is None:
        raise StatError(f"--time-window: {window!r} is not a duration such as 30s, 1m or 1h")
    secs = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if secs < 1:
        raise StatError(f"--time-window: {window!r} is shorter than 1s")
    return secs


def _own(res: Resource, all_namespaces: bool) -> dict[str, str]:
    """Matchers that select a resource's own proxies' series."""
    label = q.TYPE_LABELS[res.type][0]
    out: dict[str, str] = {}
    if not all_namespaces or (res.type == "namespace" and res.name):
        out["namespace"] = res.namespace
    if res.name and label and res.type != "namespace":
        out[label] = res.name
    return out


def _dst(res: Resource, all_namespaces: bool) -> dict[str, str]:
    """Matchers that select the series of calls to a resource (its clients' dst_* labels)."""
    label = q.TYPE_LABELS[res.type][1]
    out: dict[str, str] = {}
    if not all_namespaces or (res.type == "namespace" and res.name):
        out["dst_namespace"] = res.namespace
    if res.name and res.type != "namespace":
        out[label] = res.name
    return out


def _key(labels: Mapping[str, str], group: list[str]) -> tuple[str, str]:
    """(namespace, name) of a row from a sample's grouping labels."""
    if len(group) == 1:
        return (labels.get(group[0], ""), labels.get(group[0], ""))
    return (labels.get(group[0], ""), labels.get(group[1], ""))


@dataclass
class Counts:
    success: float = 0.0
    failure: float = 0.0

    @property
    def total(self) -> float:
        return self.success + self.failure

    def add(self, classification: str, value: float) -> None:
        if math.isnan(value):
            return
        if classification == "success":
            self.success += value
        else:
            self.failure += value


def _counts(samples: Iterable[Sample], group: list[str], extra: str | None = None) -> dict[Any, Counts]:
    out: dict[Any, Counts] = defaultdict(Counts)
    for s in samples:
        key: Any = _key(s.labels, group)
        if extra is not None:
            key = (key, s.labels.get(extra, ""))
        out[key].add(s.labels.get("classification", ""), s.value)
    return out


def _by_key(samples: Iterable[Sample], group: list[str]) -> dict[tuple[str, str], float]:
    return {_key(s.labels, group): s.value for s in samples}


def _num(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) or math.isinf(x) else x


def _rate(c: Counts | None) -> float | None:
    return None if c is None or c.total == 0 else c.success / c.total


class MetricsApi:
    """stat, routes, edges and top over one Prometheus."""

    def __init__(self, prom: Prometheus, cluster_domain: str = "cluster.local") -> None:
        self.prom = prom
        self.cluster_domain = cluster_domain

    # --- stat -----------------------------------------------------------------------------------

    def stat(self, res: Resource, window: str = "1m", *, all_namespaces: bool = False,
             from_: Resource | None = None, to: Resource | None = None,
             pods: Mapping[tuple[str, str], tuple[int, int]] | None = None) -> list[dict[str, Any]]:
        """One row per resource: golden metrics over ``window``; ``pods``: (namespace, name) ->
        (meshed, running) when the platform knows its pods (else Prometheus's targets say)."""
        secs = window_seconds(window)
        if from_ is not None and to is not None:
            raise StatError("--from and --to: give one of them")
        if res.type == "service" and to is not None:
            raise StatError("--to with svc: a Service has no proxy of its own to count its calls; use --from "
                            "on the Service or stat the deployment behind it")
        if res.type == "authority" and (to is not None or from_ is not None):
            raise StatError("--from/--to with authority: not supported (stat the deployments instead)")
        own_label = q.TYPE_LABELS[res.type][0]
        dst_label = q.TYPE_LABELS[res.type][1]
        if to is not None:  # this resource's calls to another
            sel = q.Selector.of({"direction": "outbound", **_own(res, all_namespaces), **_dst(to, False)})
            group = ["namespace"] if res.type == "namespace" else ["namespace", own_label]
            outbound = True
        elif from_ is not None or res.type == "service":  # calls to this resource, as its clients count them
            src = _own(from_, False) if from_ is not None else {}
            sel = q.Selector.of({"direction": "outbound", **src, **_dst(res, all_namespaces)})
            group = ["dst_namespace"] if res.type == "namespace" else ["dst_namespace", dst_label]
            outbound = True
        else:  # what this resource's own proxies answered
            sel = q.Selector.of({"direction": "inbound", **_own(res, all_namespaces)})
            group = ["namespace"] if res.type == "namespace" else ["namespace", own_label]
            outbound = False
        prom = self.prom.snapshot()  # every number of the table from the same scrapes
        resp = prom.query(q.responses(sel, window, [*group, "authority"] if outbound else group))
        counts: dict[tuple[str, str], Counts] = defaultdict(Counts)
        authorities: dict[str, set[tuple[str, str]]] = defaultdict(set)
        for s in resp:
            key = _key(s.labels, group)
            counts[key].add(s.labels.get("classification", ""), s.value)
            if outbound and s.labels.get("authority"):
                authorities[s.labels["authority"]].add(key)
        lat = {qq: _by_key(prom.query(q.latency(qq, sel, window, group)), group) for qq in q.QUANTILES}
        tcp: dict[tuple[str, str], float] = {}
        rd: dict[tuple[str, str], float] = {}
        wr: dict[tuple[str, str], float] = {}
        if not outbound:
            tsel = q.Selector.of({"direction": "inbound", **_own(res, all_namespaces)})
            tcp = _by_key(prom.query(q.tcp_open(tsel, group)), group)
            rd = _by_key(prom.query(q.tcp_bytes(tsel, window, group, "read")), group)
            wr = _by_key(prom.query(q.tcp_bytes(tsel, window, group, "write")), group)
        _, actual = self._route_counts(prom, sel, authorities, window) if outbound else ({}, {})
        if pods is None and res.type in ("deployment", "pod", "namespace"):
            psel = q.Selector.of(_own(res, all_namespaces))
            pgroup = ["namespace"] if res.type == "namespace" else ["namespace", own_label]
            running = _by_key(prom.query(q.meshed_pods(psel, pgroup)), pgroup)
            ready = _by_key(prom.query(q.ready_pods(psel, pgroup)), pgroup)
            pods = {k: (int(ready.get(k, 0)), int(v)) for k, v in running.items()}
        keys = set(counts)
        if not outbound and pods:
            keys |= {k for k in pods if (not res.name or k[1] == res.name or res.type == "namespace")
                     and (all_namespaces or k[0] == res.namespace)}
        rows = []
        for key in sorted(keys):
            ns, name = key
            c = counts.get(key)
            act = actual.get(key)
            if act is None:
                act, retries = c, 0
            else:
                # response_total counts a request once, whatever its tries; route_actual_* every try.
                retries = max(0, round(act.total - (c.total if c else 0)))
            stats = None
            if c is not None and c.total > 0:
                stats = {
                    "successCount": round(c.success), "failureCount": round(c.failure),
                    "latencyMsP50": _num(lat[0.5].get(key)), "latencyMsP95": _num(lat[0.95].get(key)),
                    "latencyMsP99": _num(lat[0.99].get(key)),
                    "actualSuccessCount": round(act.success) if act else 0,
                    "actualFailureCount": round(act.failure) if act else 0,
                    "actualRetries": retries,
                }
            meshed, running_n = pods.get(key, (0, 0)) if pods and not outbound else (None, None)
            rows.append({
                "resource": {"namespace": ns, "type": res.type, "name": name},
                "timeWindow": window,
                "meshedPodCount": meshed, "runningPodCount": running_n,
                "successRate": _rate(c), "rps": (c.total / secs) if c and c.total else None,
                "actualSuccessRate": _rate(act), "actualRps": (act.total / secs) if act and act.total else None,
                "stats": stats,
                "tcpStats": None if outbound else {
                    "openConnections": int(tcp[key]) if key in tcp else None,
                    "readBytesPerSec": _num(rd.get(key)), "writeBytesPerSec": _num(wr.get(key))},
            })
        return rows

    def _route_counts(self, prom: Prometheus, sel: q.Selector, authorities: Mapping[str, set[tuple[str, str]]],
                      window: str) -> tuple[dict[tuple[str, str], Counts], dict[tuple[str, str], Counts]]:
        """Per row, the route layer's effective and actual counts (empty without a ServiceProfile)."""
        if not authorities:
            return {}, {}
        src = {k: v for k, v in sel.equal if not k.startswith("dst_") and k != "direction"}
        rsel = q.Selector.of({"direction": "outbound", **src},
                             {"dst": "|".join(re.escape(a) for a in sorted(authorities))})
        out: list[dict[tuple[str, str], Counts]] = []
        for family in ("route_", "route_actual_"):
            per: dict[tuple[str, str], Counts] = defaultdict(Counts)
            for s in prom.query(q.responses(rsel, window, ["dst"], family)):
                for key in authorities.get(s.labels.get("dst", ""), ()):
                    per[key].add(s.labels.get("classification", ""), s.value)
            out.append(per)
        return out[0], out[1]

    # --- routes ---------------------------------------------------------------------------------

    def routes(self, res: Resource, window: str = "1m", *, to: Resource | None = None,
               profiles: Iterable[tuple[str, str, list[str]]] = ()) -> list[dict[str, Any]]:
        """Per route of the destination's ServiceProfile, as the clients' proxies count it.

        Without ``to``: the routes of ``res`` (every client's calls to it); with ``to``: the routes
        of ``to`` as ``res``'s proxies call it. ``profiles``: (service, namespace, route names) of the
        ServiceProfiles the platform knows, so a declared route shows even without traffic."""
        secs = window_seconds(window)
        if res.type not in ("deployment", "pod", "service") or not res.name:
            raise StatError(f"routes: {res} is not one deployment, pod or service (e.g. deploy/web)")
        if to is not None:
            if to.type not in ("deployment", "pod", "service") or not to.name:
                raise StatError(f"--to: {to} is not one deployment, pod or service")
            src, dst = _own(res, False), _dst(to, False)
        else:
            src, dst = {}, _dst(res, False)
        asel = q.Selector.of({"direction": "outbound", **src, **dst})
        prom = self.prom.snapshot()
        auths = {s.labels.get("authority", "") for s in prom.query(
            f"sum(increase(response_total{asel.render()}[{window}])) by (authority)")} - {""}
        declared: dict[str, list[str]] = {}
        for auth in auths:
            for svc, ns, names in profiles:
                if re.fullmatch(q.authority_regex(svc, ns, self.cluster_domain), auth):
                    declared.setdefault(auth, []).extend(names)
        if not auths:
            return []
        rsel = q.Selector.of({"direction": "outbound", **src}, {"dst": "|".join(re.escape(a) for a in sorted(auths))})
        group = ["dst", "rt_route"]
        eff = _counts(prom.query(q.responses(rsel, window, group, "route_")), group)
        act = _counts(prom.query(q.responses(rsel, window, group, "route_actual_")), group)
        lat = {qq: {_key(s.labels, group): s.value for s in prom.query(q.latency(qq, rsel, window, group,
                                                                                      "route_"))}
               for qq in q.QUANTILES}
        keys = set(eff) | {(auth, r) for auth, names in declared.items() for r in names}
        rows = []
        for key in sorted(keys, key=lambda k: (k[0], k[1] == "", k[1])):
            dst_name, route_name = key
            e, a = eff.get(key), act.get(key)
            rows.append({
                "route": route_name or DEFAULT_ROUTE_NAME, "authority": dst_name,
                "successRate": _rate(e), "rps": e.total / secs if e and e.total else None,
                "actualSuccessRate": _rate(a), "actualRps": a.total / secs if a and a.total else None,
                "latencyMsP50": _num(lat[0.5].get(key)), "latencyMsP95": _num(lat[0.95].get(key)),
                "latencyMsP99": _num(lat[0.99].get(key)),
                "successCount": round(e.success) if e else 0, "failureCount": round(e.failure) if e else 0,
                "actualSuccessCount": round(a.success) if a else 0, "actualFailureCount": round(a.failure) if a else 0,
            })
        return rows

    # --- edges ----------------------------------------------------------------------------------

    def edges(self, namespace: str, window: str = "1m", *, all_namespaces: bool = False) -> list[dict[str, Any]]:
        """Who calls whom between deployments, with the client's and the server's identities."""
        ns = {} if all_namespaces else {"namespace": namespace}
        prom = self.prom.snapshot()
        out_samples = prom.query(q.edges_outbound(q.Selector.of(ns), window))
        in_samples = prom.query(q.edges_inbound(q.Selector.of({}), window))
        clients: dict[tuple[str, str], set[str]] = defaultdict(set)
        for s in in_samples:
            if s.value > 0 and s.labels.get("client_id"):
                clients[(s.labels.get("namespace", ""), s.labels.get("deployment", ""))].add(s.labels["client_id"])
        edges: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        for s in out_samples:
            lb = s.labels
            if s.value <= 0 or not lb.get("dst_deployment"):
                continue
            key = (lb.get("namespace", ""), lb.get("deployment", ""), lb.get("dst_namespace", ""), lb["dst_deployment"])
            sa = lb.get("serviceaccount", "")
            prefix = f"{sa}.{key[0]}."
            client_id = next((c for c in sorted(clients.get((key[2], key[3]), ())) if c.startswith(prefix)), "")
            secured = lb.get("tls") == "true"
            e = edges.setdefault(key, {
                "src": key[1], "srcNamespace": key[0], "dst": key[3], "dstNamespace": key[2],
                "clientId": client_id, "serverId": lb.get("server_id", ""), "secured": secured,
                "msg": "" if secured else (lb.get("no_tls_reason") or "not secured by mTLS"),
                "requests": 0.0})
            e["requests"] += s.value
            e["secured"] = e["secured"] and secured
        return [edges[k] for k in sorted(edges)]

    # --- top ------------------------------------------------------------------------------------

    def top(self, res: Resource, window: str = "30s") -> list[dict[str, Any]]:
        """Per (source pod, destination, route): requests over ``window``, most first, from the
        route metrics of the resource's own proxies' calls and of its clients' calls to it."""
        secs = window_seconds(window)
        own = q.Selector.of({"direction": "outbound", **_own(res, False)})
        prom = self.prom.snapshot()
        callers_auth = {s.labels.get("authority", "") for s in prom.query(
            f"sum(increase(response_total{q.Selector.of({'direction': 'outbound', **_dst(res, False)}).render()}"
            f"[{window}])) by (authority)")} - {""}
        group = ["namespace", "pod", "dst", "rt_route"]
        rows: dict[tuple[str, ...], dict[str, Any]] = {}
        sels = [own]
        if callers_auth:
            sels.append(q.Selector.of({"direction": "outbound"},
                                      {"dst": "|".join(re.escape(a) for a in sorted(callers_auth))}))
        for sel in sels:
            cnt = prom.query(q.responses(sel, window, group, "route_"))
            p50 = {tuple(s.labels.get(g, "") for g in group): s.value
                   for s in prom.query(q.latency(0.5, sel, window, group, "route_"))}
            p99 = {tuple(s.labels.get(g, "") for g in group): s.value
                   for s in prom.query(q.latency(0.99, sel, window, group, "route_"))}
            for s in cnt:
                key = tuple(s.labels.get(g, "") for g in group)
                r = rows.setdefault(key, {"source": f"{key[0]}/{key[1]}", "destination": key[2],
                                          "route": key[3] or DEFAULT_ROUTE_NAME, "count": 0.0, "success": 0.0,
                                          "latencyMsP50": _num(p50.get(key)), "latencyMsP99": _num(p99.get(key))})
                if not math.isnan(s.value):
                    r["count"] += s.value
                    if s.labels.get("classification") == "success":
                        r["success"] += s.value
        out = []
        for r in rows.values():
            if r["count"] <= 0:
                continue
            r["successRate"] = r["success"] / r["count"]
            r["rps"] = r["count"] / secs
            r["count"] = round(r["count"])
            del r["success"]
            out.append(r)
        return sorted(out, key=lambda r: (-r["count"], r["source"], r["destination"], r["route"]))
