"""Per-entity lock backends behind one Protocol (see ``base``)."""

from .base import Lease, LockBackend

__all__ = ["Lease", "LockBackend"]
