"""Runnable examples of the consumer library (``python -m order_sidecar_client.examples.…``)."""
