"""Uploaded files (OpenAI's Files API): content-addressed bytes, owned by an organisation, within its storage
quota, gone when deleted or expired.

Bytes live in a store of their own (``<data_dir>/files``), so removing a file's bytes only has to ask whether
another file still has the same content.
"""

from __future__ import annotations

import secrets
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from openmaas.artifacts import LocalArtifactStore
from openmaas.errors import ErrorCode, InvalidRequest, NotFound, OpenMaaSError
from openmaas.store.tables import FileRow

#: What a caller may upload; batch results are written as ``batch_output``.
UPLOAD_PURPOSES = ("batch",)
OUTPUT_PURPOSE = "batch_output"
DEFAULT_TTL_S = 30 * 24 * 3600
MIN_TTL_S = 3600
MAX_TTL_S = 30 * 24 * 3600
MAX_FILENAME = 255
_CHUNK = 1 << 20


class StorageQuotaExceeded(OpenMaaSError):
    code = ErrorCode.STORAGE_QUOTA_EXCEEDED


@dataclass(frozen=True)
class StoredFile:
    id: str
    org_id: str | None
    filename: str
    purpose: str
    bytes: int
    sha256: str
    created_at: datetime
    expires_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        """OpenAI's file object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created_at.timestamp()),
            "expires_at": int(self.expires_at.timestamp()) if self.expires_at is not None else None,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


def _stored(row: FileRow) -> StoredFile:
    return StoredFile(
        row.id, row.org_id, row.filename, row.purpose, row.bytes, row.sha256, row.created_at, row.expires_at
    )


def _live(org_id: str | None) -> tuple[Any, ...]:
    """Where-clauses for an organisation's files that are neither deleted nor expired."""
    owner = FileRow.org_id.is_(None) if org_id is None else FileRow.org_id == org_id
    now = datetime.now(UTC)
    return owner, FileRow.deleted_at.is_(None), FileRow.expires_at.is_(None) | (FileRow.expires_at > now)


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


class FileService:
    def __init__(
        self, sessions: sessionmaker[Session], store: LocalArtifactStore, tmp_dir: Path, quota_bytes: int
    ) -> None:
        self._sessions = sessions
        self._store = store
        self._tmp = tmp_dir
        self.quota_bytes = quota_bytes

    # -- writing ------------------------------------------------------------------------------------------------

    def upload(
        self,
        org_id: str | None,
        filename: str,
        purpose: str,
        source: IO[bytes],
        *,
        expires_after_s: int | None = None,
        max_bytes: int,
    ) -> StoredFile:
        """Store an upload (read in chunks; refused past ``max_bytes`` or the organisation's quota)."""
        if purpose not in UPLOAD_PURPOSES:
            raise InvalidRequest(
                f"purpose '{purpose}' is not supported; files are uploaded for: {', '.join(UPLOAD_PURPOSES)}",
                param="purpose",
            )
        if not filename or len(filename) > MAX_FILENAME or "/" in filename or "\x00" in filename:
            raise InvalidRequest(f"the file needs a name of 1-{MAX_FILENAME} characters without '/'", param="file")
        if expires_after_s is not None and not MIN_TTL_S <= expires_after_s <= MAX_TTL_S:
            raise InvalidRequest(
                f"expires_after seconds must be between {MIN_TTL_S} and {MAX_TTL_S} (1 hour to 30 days)",
                param="expires_after",
            )
        self._tmp.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self._tmp, delete=False) as out:
            staged = Path(out.name)
            size = 0
            while chunk := source.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    out.close()
                    staged.unlink(missing_ok=True)
                    raise OpenMaaSError(
                        f"the file is larger than {max_bytes:,} bytes, the most a batch input may be",
                        code=ErrorCode.PAYLOAD_TOO_LARGE,
                        param="file",
                    )
                out.write(chunk)
        try:
            if size == 0:
                raise InvalidRequest("the file is empty", param="file")
            self._check_quota(org_id, size)
            artifact = self._store.put(staged)
        finally:
            staged.unlink(missing_ok=True)
        return self._insert(org_id, filename, purpose, artifact.sha256, size, expires_after_s or DEFAULT_TTL_S)

    def write_output(
        self, org_id: str | None, filename: str, data_path: Path, ttl_s: int = DEFAULT_TTL_S
    ) -> StoredFile:
        """Store a batch's results (not refused by the quota: the batch already ran, but they count against it)."""
        artifact = self._store.put(data_path)
        return self._insert(org_id, filename, OUTPUT_PURPOSE, artifact.sha256, artifact.size_bytes, ttl_s)

    def _insert(self, org_id: str | None, filename: str, purpose: str, sha: str, size: int, ttl_s: int) -> StoredFile:
        now = datetime.now(UTC)
        row = FileRow(
            id=new_file_id(),
            org_id=org_id,
            filename=filename,
            purpose=purpose,
            bytes=size,
            sha256=sha,
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
        )
        with self._sessions() as s:
            s.add(row)
            s.commit()
            return _stored(row)

    def _check_quota(self, org_id: str | None, size: int) -> None:
        used = self.used_bytes(org_id)
        if used + size > self.quota_bytes:
            raise StorageQuotaExceeded(
                f"this file ({size:,} bytes) would take the organisation's files to {used + size:,} bytes; its "
                f"quota is {self.quota_bytes:,} (OPENMAAS_FILES_QUOTA_BYTES): delete files first",
                param="file",
            )

    def used_bytes(self, org_id: str | None) -> int:
        with self._sessions() as s:
            return int(s.scalar(select(func.coalesce(func.sum(FileRow.bytes), 0)).where(*_live(org_id))) or 0)

    def delete(self, org_id: str | None, file_id: str) -> None:
        found = self.get(org_id, file_id)
        with self._sessions() as s:
            s.execute(update(FileRow).where(FileRow.id == found.id).values(deleted_at=datetime.now(UTC)))
            s.commit()
        self._forget_bytes(found.sha256)

    def sweep(self) -> int:
        """Mark expired files deleted and remove their bytes; returns how many expired."""
        now = datetime.now(UTC)
        with self._sessions() as s:
            rows = s.execute(
                select(FileRow.id, FileRow.sha256).where(FileRow.deleted_at.is_(None), FileRow.expires_at <= now)
            ).all()
            if rows:
                s.execute(update(FileRow).where(FileRow.id.in_([r.id for r in rows])).values(deleted_at=now))
                s.commit()
        for sha in {r.sha256 for r in rows}:
            self._forget_bytes(sha)
        return len(rows)

    def _forget_bytes(self, sha: str) -> None:
        with self._sessions() as s:
            live = s.scalar(select(func.count()).where(FileRow.sha256 == sha, FileRow.deleted_at.is_(None)))
        if not live:
            self._store.delete(sha)

    # -- reading ------------------------------------------------------------------------------------------------

    def get(self, org_id: str | None, file_id: str) -> StoredFile:
        """The caller's organisation's file; 404 for another's, a deleted or an expired one."""
        with self._sessions() as s:
            row = s.get(FileRow, file_id)
        now = datetime.now(UTC)
        if (
            row is None
            or row.org_id != org_id
            or row.deleted_at is not None
            or (row.expires_at is not None and row.expires_at <= now)
        ):
            raise NotFound(f"No such File object: {file_id}", param="file_id")
        return _stored(row)

    def path(self, org_id: str | None, file_id: str) -> tuple[StoredFile, Path]:
        found = self.get(org_id, file_id)
        return found, self._store.local_path(found.sha256)

    def read(self, org_id: str | None, file_id: str) -> bytes:
        return self.path(org_id, file_id)[1].read_bytes()

    def page(
        self, org_id: str | None, *, purpose: str | None, after: str | None, limit: int, order: str
    ) -> tuple[list[StoredFile], bool]:
        """One page of the organisation's files (newest first unless ``order`` is asc), after the file ``after``."""
        if not 1 <= limit <= 10_000:
            raise InvalidRequest("limit must be between 1 and 10000", param="limit")
        if order not in ("asc", "desc"):
            raise InvalidRequest("order must be asc or desc", param="order")
        q = select(FileRow).where(*_live(org_id))
        if purpose:
            q = q.where(FileRow.purpose == purpose)
        with self._sessions() as s:
            if after:
                cursor = s.get(FileRow, after)
                if cursor is None or cursor.org_id != org_id:
                    raise InvalidRequest(f"'after' names no file of yours: {after}", param="after")
                key = (cursor.created_at, cursor.id)
                if order == "desc":
                    q = q.where(
                        (FileRow.created_at < key[0]) | ((FileRow.created_at == key[0]) & (FileRow.id < key[1]))
                    )
                else:
                    q = q.where(
                        (FileRow.created_at > key[0]) | ((FileRow.created_at == key[0]) & (FileRow.id > key[1]))
                    )
            if order == "desc":
                q = q.order_by(FileRow.created_at.desc(), FileRow.id.desc())
            else:
                q = q.order_by(FileRow.created_at, FileRow.id)
            rows = s.scalars(q.limit(limit + 1)).all()
        return [_stored(r) for r in rows[:limit]], len(rows) > limit
