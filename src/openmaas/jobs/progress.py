"""A job's progress, per-epoch history and outcome, written into its row (by its worker process, or by rank 0 of
its Ray Train workers in cluster mode)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from openmaas.store.tables import JobRow


class Reporter:
    """Writes progress, per-epoch history and the outcome into the job's row."""

    def __init__(self, sessions: sessionmaker[Session], job_id: str) -> None:
        self._sessions = sessions
        self.job_id = job_id

    def row(self) -> JobRow:
        with self._sessions() as s:
            row = s.get(JobRow, self.job_id)
            assert row is not None
            return row

    def progress(
        self, fraction: float, entry: dict[str, Any] | None = None, *, replace_from: int | None = None
    ) -> None:
        with self._sessions() as s:
            row = s.get(JobRow, self.job_id)
            assert row is not None
            history = list(row.history)
            if replace_from is not None:  # a resumed job redoes epochs after its checkpoint
                history = [h for h in history if h.get("epoch", 0) < replace_from]
            if entry is not None:
                history.append(entry)
            s.execute(update(JobRow).where(JobRow.id == self.job_id).values(progress=fraction, history=history))
            s.commit()

    def cancelled(self) -> bool:
        """Asked every epoch: reads the flag alone, not the row (whose history grows with every epoch)."""
        with self._sessions() as s:
            flag = s.scalar(select(JobRow.cancel_requested).where(JobRow.id == self.job_id))
            return bool(flag)

    def finish(self, status: str, *, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        with self._sessions() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id == self.job_id, JobRow.status == "running")
                .values(
                    status=status,
                    result=result,
                    error=error,
                    finished_at=datetime.now(UTC),
                    progress=1.0 if status == "succeeded" else JobRow.progress,
                )
            )
            s.commit()
