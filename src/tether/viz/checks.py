"""``tether viz check``: checks as data (description, hint, status), as linkerd's healthcheck does."""

from __future__ import annotations

import math
from typing import Any

from tether.viz import queries as q
from tether.viz.promapi import Prometheus, PrometheusError


def _result(description: str, status: str, hint: str = "") -> dict[str, Any]:
    return {"description": description, "status": status, "hint": hint}


def run_checks(prom: Prometheus, max_age: float, local: bool) -> list[dict[str, Any]]:
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
    out.append(_result("tap: not checked (the proxy's tap server is checked by `tether viz tap`)", "skip"))
    return out
