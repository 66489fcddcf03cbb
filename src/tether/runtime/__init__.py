"""asyncio building blocks shared by the proxy and the control plane (no sockets, no platform)."""
