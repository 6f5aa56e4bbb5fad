"""Content-addressed, immutable artifact storage."""

from openmaas.artifacts.store import Artifact, ArtifactStore, LocalArtifactStore, digest_path

__all__ = ["Artifact", "ArtifactStore", "LocalArtifactStore", "digest_path"]
