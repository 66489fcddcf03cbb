"""The Kubernetes platform: the only code that talks to a Kubernetes API server (lightkube)."""
