"""The job table: create, read, cancel; progress and results as the worker reports them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from openmaas.errors import InvalidRequest, NotFound
from openmaas.store.tables import JobRow

TERMINAL = ("succeeded", "failed", "cancelled")


def job_json(row: JobRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "org_id": row.org_id,
        "type": row.type,
        "spec": row.spec,
        "status": row.status,
        "progress": row.progress,
        "history": row.history,
        "result": row.result,
        "error": row.error,
        "attempts": row.attempts,
        "created_at": row.created_at.isoformat(),
        "started_at": row.started_at.isoformat() if row.started_at else None,
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
    }


class JobService:
    def __init__(self, sessions: sessionmaker[Session], jobs_dir: Path) -> None:
        self._sessions = sessions
        self.jobs_dir = jobs_dir

    def create(self, org_id: str | None, key_id: str | None, spec: dict[str, Any]) -> dict[str, Any]:
        row = JobRow(
            id=uuid.uuid4().hex,
            org_id=org_id,
            key_id=key_id,
            type=spec["type"],
            spec=spec,
            status="queued",
            progress=0.0,
            history=[],
            attempts=0,
            cancel_requested=False,
            created_at=datetime.now(UTC),
        )
        with self._sessions() as s:
            s.add(row)
            s.commit()
            return job_json(row)

    def get(self, org_id: str | None, job_id: str, *, any_org: bool = False) -> dict[str, Any]:
        with self._sessions() as s:
            row = s.get(JobRow, job_id)
            if row is None or (not any_org and row.org_id != org_id):
                raise NotFound(f"job '{job_id}' does not exist or you do not have access to it", param="job")
            return job_json(row)

    def list(self, org_id: str | None, *, any_org: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        q = select(JobRow).order_by(JobRow.created_at.desc()).limit(limit)
        if not any_org:
            q = q.where(JobRow.org_id == org_id) if org_id else q.where(JobRow.org_id.is_(None))
        with self._sessions() as s:
            return [job_json(r) for r in s.scalars(q)]

    def cancel(self, org_id: str | None, job_id: str, *, any_org: bool = False) -> dict[str, Any]:
        """A queued job is cancelled at once; a running one when its worker has been stopped."""
        job = self.get(org_id, job_id, any_org=any_org)
        if job["status"] in TERMINAL:
            raise InvalidRequest(f"job {job_id} has already {job['status']}", param="job")
        with self._sessions() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "queued")
                .values(status="cancelled", finished_at=datetime.now(UTC), error="cancelled before it started")
            )
            s.execute(update(JobRow).where(JobRow.id == job_id).values(cancel_requested=True))
            s.commit()
        return self.get(org_id, job_id, any_org=True)

    def logs(self, job_id: str) -> str:
        path = self.jobs_dir / job_id / "log.txt"
        return path.read_text(errors="replace") if path.exists() else ""
