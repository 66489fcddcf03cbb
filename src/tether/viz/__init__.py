"""The viz extension: Prometheus for the mesh, the metrics API over it (stat, routes, top, edges),
alert rules, Grafana dashboards, a web dashboard, and live tap (:mod:`tether.viz.tap`).

Every number viz shows comes from a PromQL query written once, in :mod:`tether.viz.queries`.
"""
