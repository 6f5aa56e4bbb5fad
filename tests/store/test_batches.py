"""Files and batch results on SQLite and PostgreSQL: shared bytes, expiry, exactly-once results, leases."""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, update

from openmaas.artifacts import LocalArtifactStore
from openmaas.batches.files import FileService
from openmaas.batches.service import BatchService
from openmaas.errors import NotFound
from openmaas.store.db import session_factory, upgrade
from openmaas.store.tables import BatchResultRow, FileRow


def _services(engine: Engine, tmp_path: Path) -> tuple[FileService, BatchService, LocalArtifactStore]:
    upgrade(engine)
    sessions = session_factory(engine)
    store = LocalArtifactStore(tmp_path / "files")
    files = FileService(sessions, store, tmp_path / "tmp", quota_bytes=1 << 20)
    return files, BatchService(sessions, files), store


def _upload(files: FileService, data: bytes, org: str = "o1") -> str:
    return files.upload(org, "in.jsonl", "batch", io.BytesIO(data), max_bytes=1 << 20).id


def test_same_bytes_are_stored_once_and_removed_with_the_last_file(engine: Engine, tmp_path: Path) -> None:
    files, _, store = _services(engine, tmp_path)
    a, b = _upload(files, b"same\n"), _upload(files, b"same\n")
    sha = files.get("o1", a).sha256
    assert files.get("o1", b).sha256 == sha and files.used_bytes("o1") == 10
    files.delete("o1", a)
    assert store.exists(sha) and files.read("o1", b) == b"same\n"
    files.delete("o1", b)
    assert not store.exists(sha) and files.used_bytes("o1") == 0
    with pytest.raises(NotFound):
        files.get("o2", _upload(files, b"mine\n", org="o1"))  # another organisation's


def test_expired_files_are_gone_and_their_bytes_removed(engine: Engine, tmp_path: Path) -> None:
    files, _, store = _services(engine, tmp_path)
    old, fresh = _upload(files, b"old\n"), _upload(files, b"fresh\n")
    sha = files.get("o1", old).sha256
    with session_factory(engine)() as s:
        s.execute(update(FileRow).where(FileRow.id == old).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        s.commit()
    with pytest.raises(NotFound):
        files.get("o1", old)  # expired, even before the sweep
    assert files.sweep() == 1 and not store.exists(sha)
    assert [f.id for f in files.page("o1", purpose=None, after=None, limit=10, order="desc")[0]] == [fresh]


def test_a_line_result_is_stored_once_however_often_it_is_written(engine: Engine, tmp_path: Path) -> None:
    files, batches, _ = _services(engine, tmp_path)
    batch = batches.create("o1", "k1", _upload(files, b"{}\n"), "/v1/embeddings", "24h")
    for body in (b'{"first": 1}', b'{"second": 2}'):
        batches.store(batches.result_step(batch["id"], 1, "a", 200, body, input_tokens=3))
    with session_factory(engine)() as s:
        rows = s.scalars(select(BatchResultRow).where(BatchResultRow.batch_id == batch["id"])).all()
        assert len(rows) == 1 and rows[0].body == '{"first": 1}'
        assert s.scalar(select(func.count()).select_from(BatchResultRow)) == 1
    counts = batches.counts(batches.row(batch["id"]))
    assert (counts.completed, counts.failed, counts.input_tokens) == (1, 0, 3)


def test_a_batch_is_taken_over_only_once_its_lease_has_run_out(engine: Engine, tmp_path: Path) -> None:
    files, batches, _ = _services(engine, tmp_path)
    batch = batches.create("o1", "k1", _upload(files, b"{}\n"), "/v1/embeddings", "24h")
    assert [r.id for r in batches.claim("runner-a", lease_s=0.5)] == [batch["id"]]
    assert batches.claim("runner-b", lease_s=0.5) == []  # runner-a holds it
    time.sleep(0.6)
    taken = batches.claim("runner-b", lease_s=30)
    assert [r.id for r in taken] == [batch["id"]] and taken[0].attempts == 2
    assert batches.claim("runner-a", lease_s=30) == []


def test_an_ended_batch_keeps_its_counts_and_drops_its_per_line_results(engine: Engine, tmp_path: Path) -> None:
    files, batches, _ = _services(engine, tmp_path)
    batch = batches.create("o1", "k1", _upload(files, b"{}\n"), "/v1/embeddings", "24h")
    batches.move(batch["id"], ("validating",), "in_progress", total=3)
    batches.store(
        batches.result_step(batch["id"], 1, "a", 200, b'{"ok": 1}', input_tokens=4),
        batches.result_step(batch["id"], 2, "b", 400, b'{"error": {}}'),
    )
    output, error = batches.write_outputs(batch["id"])
    assert batches.end(batch["id"], "cancelled", output, error)
    with session_factory(engine)() as s:
        assert s.scalar(select(func.count()).select_from(BatchResultRow)) == 0
    shown = batches.get("o1", batch["id"])
    assert shown["status"] == "cancelled" and shown["cancelled_at"] is not None
    assert shown["request_counts"] == {"total": 3, "completed": 1, "failed": 1}
    assert shown["usage"]["input_tokens"] == 4
    assert files.read("o1", output or "").count(b"\n") == 1 and files.read("o1", error or "").count(b"\n") == 1
