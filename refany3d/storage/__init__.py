"""Artifact store, shard and reject writers, dataset card."""

from refany3d.storage.store import ArtifactStore, join, write_atomic

__all__ = ["ArtifactStore", "join", "write_atomic"]
