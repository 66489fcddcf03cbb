"""The admission webhooks: the proxy injector (mutating, Pods) and the resource validator (CRDs).

``admission`` is pure (an AdmissionReview in, its response out); ``server`` serves it over HTTPS with
an admin endpoint; the namespace annotations come from a narrow lookup the CLI wires in.
"""
