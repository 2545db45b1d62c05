"""Per-entity lock backends, one module each, behind the core's ``LockBackend`` Protocol.

``redis`` (pottery's Redlock), ``nats_kv`` (a JetStream KV lease), ``instrumented`` (the
metrics wrapper), ``factory`` (the backend a configuration names), and their helpers
``fairqueue`` and ``signals``.
"""

from order_sidecar.core.ports import Lease, LockBackend

__all__ = ["Lease", "LockBackend"]
