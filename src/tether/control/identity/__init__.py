"""The identity service (`tether controller identity`): a CA for workload certificates."""
