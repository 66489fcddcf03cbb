"""The inbound side: traffic from other workloads (and their proxies) to the local application."""
