"""Runs queued jobs in worker processes (lower priority, capped threads) and looks after them.

- At most ``max_jobs`` workers at once; a job is claimed with one conditional UPDATE, so several servers sharing a
  database never run the same job twice.
- A worker dies with the server (Linux parent-death signal), and jobs left ``running`` by a server that was
  killed go back to the queue at the next start and resume from their checkpoints (three attempts at most).
- A worker that exits without reporting fails its job with its exit code; cancelled jobs stop between epochs,
  or are stopped after a grace period.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from openmaas.store.tables import JobRow

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3
_CANCEL_GRACE_S = 10.0


def _child_setup() -> None:  # runs in the child between fork and exec
    os.nice(10)
    # PR_SET_PDEATHSIG: the worker is killed when the server dies, however it dies (Linux only).
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


@dataclass
class _Worker:
    job_id: str
    proc: subprocess.Popen[bytes]
    cancel_seen_at: float | None = None


def exit_reason(code: int) -> str:
    """Why a job failed when its worker ended without reporting (a crash, the kernel's out-of-memory killer)."""
    if code < 0:
        import signal

        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        hint = " (most often the kernel's out-of-memory killer: the job needed more memory than was free)"
        return f"the worker was killed by {name}{hint if -code == signal.SIGKILL else ''}; see the job's logs"
    return f"the worker exited with code {code} without finishing; see the job's logs"


class JobRunner:
    def __init__(self, sessions: sessionmaker[Session], jobs_dir: Path, env: dict[str, str], max_jobs: int) -> None:
        self._sessions = sessions
        self._jobs_dir = jobs_dir
        self._env = env
        self._max_jobs = max_jobs
        self._workers: dict[str, _Worker] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="openmaas-jobs", daemon=True)

    def start(self) -> None:
        self._recover()
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and the workers; their jobs go back to the queue and resume at the next start."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        for w in list(self._workers.values()):
            w.proc.terminate()
        for w in list(self._workers.values()):
            try:
                w.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                w.proc.kill()
            self._requeue(w.job_id)
        self._workers.clear()

    def _recover(self) -> None:
        with self._sessions() as s:
            for row in s.scalars(select(JobRow).where(JobRow.status == "running")):
                if row.attempts >= MAX_ATTEMPTS:
                    row.status, row.finished_at = "failed", datetime.now(UTC)
                    row.error = f"interrupted {row.attempts} times (server restarts); giving up"
                else:
                    row.status = "queued"
                    log.info("job interrupted by a restart goes back to the queue", extra={"job": row.id})
            s.commit()

    def _requeue(self, job_id: str) -> None:
        with self._sessions() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "running").values(status="queued"))
            s.commit()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._tick()
            except Exception:  # keep looking after jobs whatever happened to one of them
                log.exception("job runner error")

    def _tick(self) -> None:
        for w in list(self._workers.values()):
            code = w.proc.poll()
            if code is not None:
                del self._workers[w.job_id]
                self._reap(w.job_id, code)
                continue
            with self._sessions() as s:
                row = s.get(JobRow, w.job_id)
                cancel = row is not None and row.cancel_requested
            if cancel:
                now = time.monotonic()
                w.cancel_seen_at = w.cancel_seen_at or now
                if now - w.cancel_seen_at > _CANCEL_GRACE_S:
                    w.proc.kill()
        while len(self._workers) < self._max_jobs:
            job_id = self._claim()
            if job_id is None:
                break
            self._launch(job_id)

    def _claim(self) -> str | None:
        with self._sessions() as s:
            for job_id in s.scalars(
                select(JobRow.id).where(JobRow.status == "queued").order_by(JobRow.created_at).limit(5)
            ).all():
                claimed = s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.status == "queued")
                    .values(status="running", attempts=JobRow.attempts + 1, started_at=datetime.now(UTC))
                )
                s.commit()
                if claimed.rowcount == 1:  # type: ignore[attr-defined]
                    return job_id
        return None

    def _launch(self, job_id: str) -> None:
        workdir = self._jobs_dir / job_id
        workdir.mkdir(parents=True, exist_ok=True)
        with (workdir / "log.txt").open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "openmaas.jobs.worker", job_id],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env,
                preexec_fn=_child_setup,
            )
        self._workers[job_id] = _Worker(job_id, proc)
        log.info("job started", extra={"job": job_id, "pid": proc.pid})

    def _reap(self, job_id: str, code: int) -> None:
        with self._sessions() as s:
            row = s.get(JobRow, job_id)
            if row is None or row.status != "running":
                return  # the worker reported its own outcome
            if row.cancel_requested:
                row.status, row.error = "cancelled", "cancelled while running"
            else:
                row.status = "failed"
                row.error = exit_reason(code)
            row.finished_at = datetime.now(UTC)
            s.commit()
        log.info("job ended", extra={"job": job_id, "code": code})
