"""Proxy injection: a pod, its namespace's annotations and the chart values in; the injected pod out.

Pure (no I/O). ``tether inject``, the admission webhook and the chart's control-plane pods all build
the sidecar here, so they cannot drift.
"""

from tether.core.inject.annotations import AnnotationError, ProxyOverrides
from tether.core.inject.pod import InjectError, Injection, inject, is_injected, uninject
from tether.core.inject.values import InjectValues, ValuesError, merge

__all__ = ["AnnotationError", "InjectError", "InjectValues", "Injection", "ProxyOverrides", "ValuesError",
           "inject", "is_injected", "merge", "uninject"]
