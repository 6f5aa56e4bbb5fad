from __future__ import annotations

from pathlib import Path

import pytest

from openmaas.artifacts import LocalArtifactStore, digest_path


def test_files_are_content_addressed_and_deduplicated(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    a = tmp_path / "a.onnx"
    a.write_bytes(b"model-bytes")
    b = tmp_path / "b.onnx"
    b.write_bytes(b"model-bytes")
    first, second = store.put(a), store.put(b)
    assert first == second
    import hashlib

    assert first.sha256 == hashlib.sha256(b"model-bytes").hexdigest()
    assert store.local_path(first.sha256).read_bytes() == b"model-bytes"
    assert first.size_bytes == len(b"model-bytes")


def test_stored_artifacts_are_read_only(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    src = tmp_path / "m.bin"
    src.write_bytes(b"x")
    path = store.local_path(store.put(src).sha256)
    # Mode bits, not an open() attempt: tests may run as root, which ignores them.
    assert path.stat().st_mode & 0o222 == 0


def test_folders_hash_by_relative_paths_and_contents(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        (d / "sub").mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "sub" / "w.safetensors").write_bytes(b"weights")
    assert digest_path(one) == digest_path(two)
    (two / "sub" / "w.safetensors").chmod(0o644)
    (two / "sub" / "w.safetensors").write_bytes(b"other")
    assert digest_path(one)[0] != digest_path(two)[0]
    store = LocalArtifactStore(tmp_path / "store")
    art = store.put(one)
    assert art.is_dir
    assert (store.local_path(art.sha256) / "sub" / "w.safetensors").read_bytes() == b"weights"


def test_unknown_and_malformed_digests(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    with pytest.raises(FileNotFoundError):
        store.local_path("0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        store.local_path("../../etc/passwd")
