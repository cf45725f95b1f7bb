"""The errors the storage layer raises; each message names the path and what to do."""
from __future__ import annotations


class StoreError(RuntimeError):
    """The store cannot be used as asked (not writable, bad name, bad manifest...)."""


class ArtifactLockedError(StoreError):
    """Another live writer holds the artifact's lock and did not release it in time."""


class ArtifactCompleteError(StoreError):
    """A write was attempted into an artifact that is already complete."""
