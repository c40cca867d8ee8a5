"""The management endpoint of a server: health, Prometheus metrics, a JSON API and the
dashboards, on an address of its own (docs/OBSERVABILITY.md)."""

from .endpoint import ManagementEndpoint, parse_manage_address

__all__ = ["ManagementEndpoint", "parse_manage_address"]
