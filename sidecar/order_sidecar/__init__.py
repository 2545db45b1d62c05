"""nats-order-sidecar: per-entity ordered publishing to NATS JetStream from many producers."""

__version__ = "0.1.0"
