"""``tether viz check``: checks as data (description, hint, status), as linkerd's healthcheck does."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tether.viz import queries as q
from tether.viz.promapi import Prometheus, PrometheusError


def _result(description: str, status: str, hint: str = "") -> dict[str, Any]:
    return {"description": description, "status": status, "hint": hint}


TapProbe = Callable[[], list[dict[str, Any]]]


def run_checks(prom: Prometheus, max_age: float, local: bool,
               tap_probe: TapProbe | None = None) -> list[dict[str, Any]]:
    out = []
    if not prom.ready():
        out.append(_result(f"Prometheus is reachable and ready at {prom.url}", "fail",
                           "start it with `tether viz install`, or check --prometheus-url"))
        return out
    out.append(_result(f"Prometheus is reachable and ready at {prom.url}", "ok"))
    try:
        targets = prom.targets()
    except PrometheusError as e:
        out.append(_result("Prometheus lists its targets", "fail", str(e)))
        return out
    for job, what in ((q.PROXY_JOB, "proxies"), (q.CONTROLLER_JOB, "control-plane components")):
        mine = [t for t in targets if t.get("labels", {}).get("job") == job]
        down = [t for t in mine if t.get("health") != "up"]
        if not mine:
            out.append(_result(f"Prometheus scrapes the {what} (job {job})", "fail",
                               "no target: is the mesh running, and the scrape config in place "
                               "(`tether viz scrape-config`)?"))
        elif down:
            names = ", ".join(f"{t['labels'].get('namespace', '')}/{t['labels'].get('pod', t.get('scrapeUrl'))}"
                              for t in down[:5])
            out.append(_result(f"every {what[:-1] if what.endswith('s') else what} answers its scrape "
                               f"({len(mine) - len(down)}/{len(mine)} up)", "warn",
                               f"down: {names}: {down[0].get('lastError', '')}"))
        else:
            out.append(_result(f"every one of the {len(mine)} {what} answers its scrape", "ok"))
    try:
        age = prom.query(q.freshness())
    except PrometheusError as e:
        out.append(_result("data is fresh", "fail", str(e)))
        return out
    secs = age[0].value if age else math.nan
    if math.isnan(secs):
        out.append(_result("data is fresh", "fail", "no samples from the mesh yet"))
    elif secs > max_age:
        out.append(_result(f"data is fresh (newest scrape {secs:.0f}s old)", "fail",
                           f"older than --max-age {max_age:g}s: is Prometheus scraping?"))
    else:
        out.append(_result(f"data is fresh (newest scrape {secs:.1f}s old)", "ok"))
    if local:
        try:
            groups = prom.rules()
        except PrometheusError as e:
            out.append(_result("the alert rules are loaded", "fail", str(e)))
        else:
            n = sum(len(g.get("rules", [])) for g in groups)
            out.append(_result(f"the alert rules are loaded ({n} rules)", "ok" if n else "fail",
                               "" if n else "re-run `tether viz install`"))
    if tap_probe is None:
        out.append(_result("tap: not checked (no local mesh here: `tether viz tap` checks a proxy's tap server)",
                           "skip"))
    else:
        out.extend(tap_probe())
    return out


def tap_results(state_dir: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every running meshed pod's proxy accepts a tap from viz's identity (the local mesh)."""
    import asyncio

    from tether.viz import tap

    try:
        mesh = tap.Mesh.load(state_dir)
        creds = tap.ClientCredentials(mesh)
    except tap.TapError as e:
        return [_result("every proxy accepts a tap", "fail", str(e))]
    if not mesh.pods:
        return [_result("tap: no meshed pod running to tap", "skip")]

    async def probe_all() -> list[str]:
        sem = asyncio.Semaphore(16)

        async def one(pod: tap.Pod) -> str:
            async with sem:
                try:
                    await tap.probe(pod, creds, timeout=timeout)
                except tap.TapError as e:
                    return str(e)
                return ""

        return [e for e in await asyncio.gather(*(one(p) for p in mesh.pods)) if e]

    errors = asyncio.run(probe_all())
    n = len(mesh.pods)
    if errors:
        return [_result(f"every proxy accepts a tap ({n - len(errors)}/{n})", "fail",
                        "; ".join(errors[:3]) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else ""))]
    return [_result(f"every one of the {n} proxies accepts a tap", "ok")]
