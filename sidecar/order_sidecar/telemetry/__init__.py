"""What operators see: Prometheus metrics and structured logs, shared by every layer above
the core."""
