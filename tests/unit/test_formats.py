"""Format detection, and refusing anything pickle-based with a message naming the safe formats."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest

from openmaas.errors import InvalidRequest, UnsafeFormat, UnsupportedFormat
from openmaas.registry.uploads import unpack
from openmaas.runtimes.formats import detect_format


def test_onnx_and_skops_by_suffix(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    (tmp_path / "m.skops").write_bytes(b"PK\x03\x04")
    assert detect_format(tmp_path / "m.onnx") == "onnx"
    assert detect_format(tmp_path / "m.skops") == "skops"


@pytest.mark.parametrize("name", ["model.pkl", "model.joblib", "model.pt", "weights.pth", "model.bin"])
def test_pickle_suffixes_are_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    with pytest.raises(UnsafeFormat) as info:
        detect_format(path)
    assert "ONNX" in info.value.message and "safetensors" in info.value.message and "skops" in info.value.message


def test_pickle_content_is_refused_whatever_the_name(tmp_path: Path) -> None:
    disguised = tmp_path / "model.onnx"
    disguised.write_bytes(pickle.dumps([1, 2, 3], protocol=4))
    with pytest.raises(UnsafeFormat):
        detect_format(disguised)


def test_torch_zip_checkpoint_is_refused(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "model.onnx"  # a lying suffix does not help
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(UnsafeFormat):
        detect_format(path)


def test_declared_pickle_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(UnsafeFormat):
        detect_format(tmp_path / "m.onnx", "joblib")


def test_folder_with_pickle_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(1))
    with pytest.raises(UnsafeFormat, match=r"pytorch_model\.bin"):
        detect_format(tmp_path)


def test_sentence_transformers_folder(minilm_dir: Path) -> None:
    assert detect_format(minilm_dir) == "sentence-transformers"
    with pytest.raises(UnsupportedFormat, match="format 'onnx' was given"):
        detect_format(minilm_dir, "onnx")


def test_unknown_files_and_formats(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UnsupportedFormat, match="cannot tell"):
        detect_format(tmp_path / "notes.txt")
    with pytest.raises(UnsupportedFormat, match="unknown format"):
        detect_format(tmp_path / "notes.txt", "tensorflow")
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(UnsupportedFormat, match="safetensors"):
        detect_format(folder)


def test_archive_with_path_traversal_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../../etc/evil", "x")
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(InvalidRequest, match="unsafe path"):
        unpack(archive, dest, max_bytes=10_000)


def test_archive_unpacks_single_top_folder(tmp_path: Path) -> None:
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("model/config.json", "{}")
        z.writestr("model/model.safetensors", "x")
    dest = tmp_path / "out"
    dest.mkdir()
    folder = unpack(archive, dest, max_bytes=10_000)
    assert folder.name == "model"
    assert (folder / "config.json").read_text() == "{}"


def test_every_recognised_format_has_a_runtime_and_every_runtime_a_format() -> None:
    from openmaas.runtimes import RUNTIMES
    from openmaas.runtimes.formats import FORMATS

    assert set(FORMATS) == set(RUNTIMES)
