#!/usr/bin/env python3
"""Start a local Kubernetes control plane with kwok nodes: `python scripts/kube/cluster.py up`.

A thin entry point over tether.testing.kubecluster (importable by tests); works from a checkout
without installing the package, as long as `cryptography` is importable (use .venv/bin/python).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from tether.testing.kubecluster import main

if __name__ == "__main__":
    sys.exit(main())
