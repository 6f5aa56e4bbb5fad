"""Batches: their rows, OpenAI's batch object, the state machine, and each line's result stored exactly once.

A line's result row is written in the same transaction as its usage record (``result_step``, run by the metering
writer), keyed by (batch, line) with ON CONFLICT DO NOTHING: a line computed twice, after a crash, leaves one row,
one usage record and one charge. The batch's counts are counted from those rows, never kept beside them.
"""

from __future__ import annotations

import secrets
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import case, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from openmaas.batches.files import DEFAULT_TTL_S, MAX_TTL_S, MIN_TTL_S, FileService
from openmaas.batches.lines import LineError, endpoint_error, window_seconds
from openmaas.errors import AlreadyExists, InvalidRequest, NotFound
from openmaas.store.tables import BatchResultRow, BatchRow

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")
MAX_METADATA = 16
#: A line's result as the metering writer takes it: an INSERT built once, and the row's values.
ResultStep = tuple[Any, dict[str, Any]]


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


def line_request_id(batch_id: str, line: int) -> str:
    """A line's request id: the same on every run of the batch (its usage record and charge are keyed by it)."""
    return f"{batch_id}-{line}"


def _ts(when: datetime | None) -> int | None:
    return int(when.timestamp()) if when is not None else None


@dataclass(frozen=True)
class Counts:
    completed: int
    failed: int
    input_tokens: int
    output_tokens: int


def _check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if (
        not isinstance(metadata, dict)
        or len(metadata) > MAX_METADATA
        or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items()
        )
    ):
        raise InvalidRequest(
            f"metadata takes at most {MAX_METADATA} string pairs (keys up to 64, values up to 512 characters)",
            param="metadata",
        )
    return metadata


class BatchService:
    def __init__(self, sessions: sessionmaker[Session], files: FileService) -> None:
        self._sessions = sessions
        self.files = files
        dialect = sessions.kw["bind"].dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        # Built once: the metering writer runs it with every result of a group in one executemany.
        self._result_insert = insert(BatchResultRow).on_conflict_do_nothing()

    # -- the API's side -----------------------------------------------------------------------------------------

    def create(
        self,
        org_id: str | None,
        key_id: str,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: Any = None,
        output_ttl_s: int | None = None,
    ) -> dict[str, Any]:
        """A batch in ``validating``; the runner checks its file (what fails there fails the batch, not this)."""
        why = endpoint_error(endpoint)
        if why is not None:
            raise InvalidRequest(why, param="endpoint")
        try:
            window = window_seconds(completion_window)
        except ValueError as e:
            raise InvalidRequest(str(e), param="completion_window") from None
        meta = _check_metadata(metadata)
        if output_ttl_s is not None and not MIN_TTL_S <= output_ttl_s <= MAX_TTL_S:
            raise InvalidRequest(
                f"output_expires_after seconds must be between {MIN_TTL_S} and {MAX_TTL_S} (1 hour to 30 days)",
                param="output_expires_after",
            )
        found = self.files.get(org_id, input_file_id)  # 404 for an unknown or another organisation's file
        if found.purpose != "batch":
            raise InvalidRequest(
                f"file {input_file_id} was uploaded for '{found.purpose}', not 'batch'", param="input_file_id"
            )
        now = datetime.now(UTC)
        row = BatchRow(
            id=new_batch_id(),
            org_id=org_id,
            key_id=key_id,
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=completion_window,
            meta=meta,
            output_ttl_s=output_ttl_s,
            status="validating",
            total=0,
            created_at=now,
            expires_at=now + timedelta(seconds=window),
            attempts=0,
        )
        with self._sessions() as s:
            s.add(row)
            s.commit()
            return self.to_json(row, Counts(0, 0, 0, 0))

    def get(self, org_id: str | None, batch_id: str) -> dict[str, Any]:
        row = self._owned(org_id, batch_id)
        return self.to_json(row, self.counts(row))

    def page(self, org_id: str | None, *, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """The organisation's batches, newest first, after the batch ``after``."""
        if not 1 <= limit <= 100:
            raise InvalidRequest("limit must be between 1 and 100", param="limit")
        q = select(BatchRow).where(BatchRow.org_id.is_(None) if org_id is None else BatchRow.org_id == org_id)
        with self._sessions() as s:
            if after:
                cursor = s.get(BatchRow, after)
                if cursor is None or cursor.org_id != org_id:
                    raise InvalidRequest(f"'after' names no batch of yours: {after}", param="after")
                q = q.where(
                    (BatchRow.created_at < cursor.created_at)
                    | ((BatchRow.created_at == cursor.created_at) & (BatchRow.id < cursor.id))
                )
            rows = s.scalars(q.order_by(BatchRow.created_at.desc(), BatchRow.id.desc()).limit(limit + 1)).all()
        return [self.to_json(r, self.counts(r)) for r in rows[:limit]], len(rows) > limit

    def cancel(self, org_id: str | None, batch_id: str) -> tuple[dict[str, Any], bool]:
        """Ask the runner to stop (``cancelling``; ``cancelled`` once the lines in flight are done). Returns the
        batch and whether this call changed it; a finished batch is left as it is (409)."""
        row = self._owned(org_id, batch_id)
        changed = False
        if row.status in ("validating", "in_progress"):
            now = datetime.now(UTC)
            with self._sessions() as s:
                result = s.execute(
                    update(BatchRow)
                    .where(BatchRow.id == batch_id, BatchRow.status.in_(("validating", "in_progress")))
                    .values(status="cancelling", cancelling_at=now)
                )
                s.commit()
                changed = result.rowcount == 1  # type: ignore[attr-defined]
        elif row.status not in ("cancelling", "cancelled"):
            raise AlreadyExists(f"batch {batch_id} is {row.status} and can no longer be cancelled", param="batch_id")
        return self.get(org_id, batch_id), changed

    def _owned(self, org_id: str | None, batch_id: str) -> BatchRow:
        with self._sessions() as s:
            row = s.get(BatchRow, batch_id)
        if row is None or row.org_id != org_id:
            raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
        return row

    def counts(self, row: BatchRow) -> Counts:
        """Answered and refused lines and their tokens: the stored final counts of an ended batch, else counted
        from its results."""
        if row.final_counts is not None:
            return Counts(**row.final_counts)
        return self._count_results(row.id)

    def _count_results(self, batch_id: str) -> Counts:
        ok = (BatchResultRow.status_code >= 200) & (BatchResultRow.status_code < 300)
        with self._sessions() as s:
            r = s.execute(
                select(
                    func.coalesce(func.sum(case((ok, 1), else_=0)), 0),
                    func.coalesce(func.sum(case((ok, 0), else_=1)), 0),
                    func.coalesce(func.sum(BatchResultRow.input_tokens), 0),
                    func.coalesce(func.sum(BatchResultRow.output_tokens), 0),
                ).where(BatchResultRow.batch_id == batch_id)
            ).one()
        return Counts(int(r[0]), int(r[1]), int(r[2]), int(r[3]))

    @staticmethod
    def to_json(row: BatchRow, counts: Counts) -> dict[str, Any]:
        """OpenAI's batch object."""
        errors = {"object": "list", "data": row.errors} if row.errors else None
        return {
            "id": row.id,
            "object": "batch",
            "endpoint": row.endpoint,
            "model": row.model,
            "errors": errors,
            "input_file_id": row.input_file_id,
            "completion_window": row.completion_window,
            "status": row.status,
            "output_file_id": row.output_file_id,
            "error_file_id": row.error_file_id,
            "created_at": _ts(row.created_at),
            "in_progress_at": _ts(row.in_progress_at),
            "expires_at": _ts(row.expires_at),
            "finalizing_at": _ts(row.finalizing_at),
            "completed_at": _ts(row.completed_at),
            "failed_at": _ts(row.failed_at),
            "expired_at": _ts(row.expired_at),
            "cancelling_at": _ts(row.cancelling_at),
            "cancelled_at": _ts(row.cancelled_at),
            "request_counts": {"total": row.total, "completed": counts.completed, "failed": counts.failed},
            "metadata": row.meta,
            "usage": {
                "input_tokens": counts.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": counts.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": counts.input_tokens + counts.output_tokens,
            },
        }

    # -- the runner's side --------------------------------------------------------------------------------------

    def claim(self, runner: str, lease_s: float) -> list[BatchRow]:
        """Take every active batch no runner holds (none, or its lease ran out): a batch whose process died is
        taken over once its lease ends, as is one this runner stopped running without ending it (an error: it is
        tried again). Each claim counts a run (``attempts``); ``renew`` keeps the runner's own."""
        now = datetime.now(UTC)
        claimed: list[BatchRow] = []
        with self._sessions() as s:
            ids = s.scalars(
                select(BatchRow.id).where(
                    BatchRow.status.in_(ACTIVE),
                    BatchRow.runner.is_(None) | (BatchRow.lease_until < now),
                )
            ).all()
            for batch_id in ids:
                result = s.execute(
                    update(BatchRow)
                    .where(
                        BatchRow.id == batch_id,
                        BatchRow.runner.is_(None) | (BatchRow.lease_until < now),
                    )
                    .values(
                        runner=runner,
                        lease_until=now + timedelta(seconds=lease_s),
                        attempts=BatchRow.attempts + 1,
                    )
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    s.commit()
                    row = s.get(BatchRow, batch_id)
                    if row is not None:
                        s.refresh(row)
                        claimed.append(row)
        return claimed

    def renew(self, runner: str, batch_ids: list[str], lease_s: float) -> None:
        if not batch_ids:
            return
        with self._sessions() as s:
            s.execute(
                update(BatchRow)
                .where(BatchRow.id.in_(batch_ids), BatchRow.runner == runner)
                .values(lease_until=datetime.now(UTC) + timedelta(seconds=lease_s))
            )
            s.commit()

    def let_go(self, runner: str) -> None:
        """Give up every claim of ``runner`` (a clean shutdown): the next start takes its batches over at once."""
        with self._sessions() as s:
            s.execute(
                update(BatchRow)
                .where(BatchRow.runner == runner, BatchRow.status.in_(ACTIVE))
                .values(runner=None, lease_until=None)
            )
            s.commit()

    def row(self, batch_id: str) -> BatchRow:
        with self._sessions() as s:
            row = s.get(BatchRow, batch_id)
        if row is None:
            raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
        return row

    def move(self, batch_id: str, frm: tuple[str, ...], to: str, **values: Any) -> bool:
        """Move a batch from one of ``frm`` to ``to`` (with its timestamp); False if it was not in ``frm``."""
        stamp = {f"{to}_at": datetime.now(UTC)} if to != "validating" else {}
        with self._sessions() as s:
            result = s.execute(
                update(BatchRow)
                .where(BatchRow.id == batch_id, BatchRow.status.in_(frm))
                .values(status=to, **stamp, **values)
            )
            s.commit()
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def fail(self, batch_id: str, errors: list[LineError]) -> bool:
        return self.move(
            batch_id, ("validating", "cancelling"), "failed", errors=[e.to_json() for e in errors], runner=None
        )

    def end(self, batch_id: str, status: str, output: str | None, error: str | None, **values: Any) -> bool:
        """End a batch: its files and final counts on its row, then its per-line results removed (they live on in
        its output and error files; a crash in between leaves rows that nothing reads)."""
        counts = self._count_results(batch_id)
        moved = self.move(
            batch_id,
            ("finalizing", "cancelling", "in_progress"),
            status,
            output_file_id=output,
            error_file_id=error,
            final_counts=counts.__dict__,
            runner=None,
            **values,
        )
        if moved:
            with self._sessions() as s:
                s.execute(delete(BatchResultRow).where(BatchResultRow.batch_id == batch_id))
                s.commit()
        return moved

    def done_lines(self, batch_id: str) -> set[int]:
        with self._sessions() as s:
            return set(s.scalars(select(BatchResultRow.line).where(BatchResultRow.batch_id == batch_id)).all())

    def result_step(
        self,
        batch_id: str,
        line: int,
        custom_id: str,
        status_code: int,
        body: bytes,
        *,
        error: dict[str, Any] | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> ResultStep:
        """One line's result: the statement and values that store it, in the usage record's transaction (the
        metering writer's ``UsageRecord.also``) or in one of its own (``store``)."""
        values = {
            "batch_id": batch_id,
            "line": line,
            "custom_id": custom_id,
            "request_id": line_request_id(batch_id, line),
            "status_code": status_code,
            "body": body.decode("utf-8", "replace"),
            "error": error,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "created_at": datetime.now(UTC),
        }
        return self._result_insert, values

    def store(self, *steps: ResultStep) -> None:
        """Write results in a transaction of their own (lines with no usage record: error lines)."""
        if not steps:
            return
        with self._sessions() as s:
            s.connection().execute(steps[0][0], [values for _, values in steps])
            s.commit()

    def write_outputs(self, batch_id: str) -> tuple[str | None, str | None]:
        """The output file (2xx lines) and the error file (the rest), in line order; None for an empty one."""
        row = self.row(batch_id)
        with tempfile.TemporaryDirectory() as tmp:
            paths = {"output": Path(tmp) / "output.jsonl", "error": Path(tmp) / "errors.jsonl"}
            written = {"output": 0, "error": 0}
            with paths["output"].open("wb") as out, paths["error"].open("wb") as err, self._sessions() as s:
                results = s.execute(
                    select(BatchResultRow).where(BatchResultRow.batch_id == batch_id).order_by(BatchResultRow.line)
                ).scalars()
                for r in results:
                    ok = 200 <= r.status_code < 300
                    response = (
                        {
                            "status_code": r.status_code,
                            "request_id": r.request_id,
                            "body": orjson.Fragment(r.body.encode()),
                        }
                        if r.status_code
                        else None
                    )
                    item = {
                        "id": f"batch_req_{r.request_id}",
                        "custom_id": r.custom_id,
                        "response": response,
                        "error": r.error,
                    }
                    target = out if ok else err
                    target.write(orjson.dumps(item) + b"\n")
                    written["output" if ok else "error"] += 1
            ids: dict[str, str | None] = {}
            for kind, path in paths.items():
                ids[kind] = (
                    self.files.write_output(
                        row.org_id, f"{batch_id}_{kind}.jsonl", path, row.output_ttl_s or DEFAULT_TTL_S
                    ).id
                    if written[kind]
                    else None
                )
        return ids["output"], ids["error"]
