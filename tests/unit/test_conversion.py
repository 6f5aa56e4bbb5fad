"""One-time conversions: where they go (beside the artifact, or in the shared cache by digest) and that processes
sharing a target convert it once between them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from openmaas.artifacts.store import LocalArtifactStore
from openmaas.runtimes import conversion
from openmaas.runtimes.causal_lm import _int8_target
from openmaas.runtimes.gguf import converted_target

ROOT = Path(__file__).resolve().parents[2]

# A process that converts `source` into `target` through convert_once and prints what it returned.
_CONVERT = """
import sys
from pathlib import Path
from openmaas.runtimes.conversion import convert_once
source, runs, target = sys.argv[1:4]
print(convert_once(Path(target), "tests.unit.slow_converter", [source, runs], "converting the test model"))
"""


@pytest.fixture
def no_cache() -> Iterator[None]:
    yield
    conversion.use_cache(None)


def test_conversions_go_beside_the_artifact_or_to_the_cache_under_its_digest(tmp_path: Path, no_cache: None) -> None:
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF not really")
    store = LocalArtifactStore(tmp_path / "store")
    artifact = store.put(source)
    path = store.local_path(artifact.sha256)

    conversion.use_cache(None)
    assert converted_target(path) == path.parent / "converted"
    assert _int8_target(converted_target(path)) == path.parent / "converted.onnx-int8"

    conversion.use_cache(tmp_path / "cache")
    home = tmp_path.resolve() / "cache" / artifact.sha256
    assert converted_target(path) == home / "converted"
    assert _int8_target(converted_target(path)) == home / "converted.onnx-int8"
    folder = store.put(tmp_path / "store" / "sha256" / artifact.sha256)  # a stored folder (a transformers model)
    assert (
        _int8_target(store.local_path(folder.sha256)) == tmp_path.resolve() / "cache" / folder.sha256 / "tree.onnx-int8"
    )
    # A path outside a store has no digest to file it under: its conversions stay beside it.
    assert converted_target(source) == tmp_path / "converted"


def test_two_processes_sharing_a_target_convert_it_once(tmp_path: Path) -> None:
    source, runs, target = tmp_path / "source.json", tmp_path / "runs.txt", tmp_path / "cache" / "abc" / "converted"
    source.write_text('{"converted": true}')
    first, second = (
        subprocess.Popen(
            [sys.executable, "-c", _CONVERT, str(source), str(runs), str(target)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    )
    outputs = [p.communicate(timeout=60) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == [str(target)] * 2
    assert len(runs.read_text().split()) == 1  # one converter child ran; before, each process ran its own
    assert (target / "config.json").read_text() == '{"converted": true}'
    assert not [p for p in target.parent.iterdir() if "staging" in p.name]


def test_a_process_waiting_for_another_ones_conversion_says_so(tmp_path: Path) -> None:
    source, runs, target = tmp_path / "source.json", tmp_path / "runs.txt", tmp_path / "converted"
    source.write_text("{}")
    other = _converting_elsewhere(source, runs, target, seconds=3)  # it holds the lock
    try:
        done: list[Path] = []
        waiting = threading.Thread(
            target=lambda: done.append(
                conversion.convert_once(target, "tests.unit.slow_converter", [str(source), str(runs)], "converting")
            )
        )
        waiting.start()
        deadline = time.monotonic() + 5
        while conversion.progress(target) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        shown = conversion.progress(target)
        assert shown is not None and shown.step == "waiting for another process converting it"
        waiting.join(30)
        assert done == [target] and conversion.progress(target) is None
        assert len(runs.read_text().split()) == 1
    finally:
        other.wait(30)


def test_a_converter_does_not_outlive_the_process_that_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server killed mid-conversion took its converter child with it; before, the child went on converting for
    minutes into a folder nobody would use. The next conversion of the target clears what it left."""
    source, runs, target = tmp_path / "source.json", tmp_path / "runs.txt", tmp_path / "converted"
    source.write_text("{}")
    parent = _converting_elsewhere(source, runs, target, seconds=60)
    child = int(runs.read_text().split()[0])
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    assert [p.name for p in tmp_path.glob("converted-staging-*")] == []  # it had not made its folder yet

    (tmp_path / f"converted-staging-{child}-1").mkdir()  # as one that died after making it leaves it
    monkeypatch.setenv("SLOW_CONVERTER_SECONDS", "0")
    conversion.convert_once(target, "tests.unit.slow_converter", [str(source), str(runs)], "converting")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("converted")) == ["converted"]


def _converting_elsewhere(source: Path, runs: Path, target: Path, seconds: float) -> subprocess.Popen[bytes]:
    """Another process converting ``target`` (its converter takes ``seconds``), once its converter has started."""
    process = subprocess.Popen(
        [sys.executable, "-c", _CONVERT, str(source), str(runs), str(target)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "SLOW_CONVERTER_SECONDS": str(seconds)},
    )
    deadline = time.monotonic() + 30
    while not runs.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return process


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
