"""Cluster mode: N gateways as one regional service, coordinated through Redis."""
