"""Install manifests: chart values checked and merged, the control plane and CRDs rendered (pure).

``tether install`` renders with this package; the Helm charts in charts/ render the same objects
(tests/kube/test_charts.py runs `helm template` and compares).
"""
