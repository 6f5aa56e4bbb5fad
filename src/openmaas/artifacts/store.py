"""Artifacts are files or folders addressed by sha256 and never changed once written.

The interface is small (``put``, ``local_path``, ``exists``) so that an fsspec-backed store (shared filesystem,
S3-compatible object store) can implement it for cluster mode; ``local_path`` then materialises a cached copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Artifact:
    sha256: str
    size_bytes: int
    is_dir: bool


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest_path(path: Path) -> tuple[str, int]:
    """sha256 and size of a file, or of a folder (over its sorted relative paths and file digests)."""
    if path.is_file():
        return _file_digest(path), path.stat().st_size
    h = hashlib.sha256()
    size = 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        h.update(rel.encode() + b"\0" + _file_digest(file).encode() + b"\n")
        size += file.stat().st_size
    return h.hexdigest(), size


class ArtifactStore(ABC):
    @abstractmethod
    def put(self, source: Path) -> Artifact:
        """Store a file or folder (copied); storing the same content twice returns the same artifact."""

    @abstractmethod
    def local_path(self, sha256: str) -> Path:
        """A local path holding the artifact's content (the file itself, or the folder)."""

    @abstractmethod
    def exists(self, sha256: str) -> bool: ...


class LocalArtifactStore(ArtifactStore):
    """Artifacts under ``root/sha256/<hex>/{blob|tree}``, written atomically and made read-only."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def _entry(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return self.root / "sha256" / sha256

    def put(self, source: Path) -> Artifact:
        if not source.exists():
            raise FileNotFoundError(source)
        is_dir = source.is_dir()
        staging = self.root / "tmp" / uuid.uuid4().hex
        staging.mkdir()
        try:
            target = staging / ("tree" if is_dir else "blob")
            if is_dir:
                shutil.copytree(source, target, symlinks=False)
            else:
                shutil.copyfile(source, target)
            # Digest the copy, not the source, so what is addressed is exactly what is stored.
            sha, size = digest_path(target)
            final = self._entry(sha)
            if not final.exists():
                _make_read_only(staging)
                try:
                    os.rename(staging, final)
                except OSError:
                    if not final.exists():  # pragma: no cover - a real filesystem failure
                        raise
            return Artifact(sha256=sha, size_bytes=size, is_dir=is_dir)
        finally:
            if staging.exists():
                _remove(staging)

    def local_path(self, sha256: str) -> Path:
        entry = self._entry(sha256)
        for name in ("blob", "tree"):
            if (entry / name).exists():
                return entry / name
        raise FileNotFoundError(f"artifact {sha256} is not in the store")

    def exists(self, sha256: str) -> bool:
        return self._entry(sha256).exists()

    def delete(self, sha256: str) -> None:
        """Remove an artifact (callers make sure nothing refers to it any more)."""
        entry = self._entry(sha256)
        if entry.exists():
            _remove(entry)


def _make_read_only(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        if p.is_file():
            p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def _remove(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        if p.is_dir():
            p.chmod(stat.S_IRWXU)
        else:
            p.chmod(stat.S_IRUSR | stat.S_IWUSR)
    shutil.rmtree(path)
