"""Workload identity, pure: names, SPIFFE ids, CSRs, issuance policy and certificate checks."""
