"""Leases of gateway processes, and giving back the billing holds of one that died.

Every server process has a row in ``gateways`` that a thread of its own renews every ``RENEW_S`` seconds, and
each hold it takes names it (``holds.holder``). A process killed mid-call (``kill -9``, a lost machine) leaves its
calls' holds open: once its lease is ``STALE_S`` old, any other running process (or the same machine's next
start) releases them, money back to the wallet. A hold settles only while open; a call that was slower than the
lease and settles after its hold was given back pays from the wallet directly (``settlement.settle``), so the
money is right either way.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, insert, select, update

from openmaas.billing import settlement
from openmaas.billing.plans import PendingCharge
from openmaas.store.tables import GatewayRow, HoldRow

log = logging.getLogger(__name__)

RENEW_S = 2.0
#: A lease this old belongs to a process that is gone (seven missed renewals).
STALE_S = 15.0
#: Gateway rows kept this long after their last renewal, for operators to see (then deleted).
FORGET_AFTER = timedelta(days=1)


def new_holder_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class HoldKeeper:
    """Renews this process's lease and releases the holds of processes whose lease lapsed."""

    def __init__(self, engine: Engine, holder: str) -> None:
        self._engine = engine
        self.holder = holder
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(
                insert(GatewayRow).values(
                    id=self.holder, host=socket.gethostname()[:255], pid=os.getpid(), started_at=now, seen_at=now
                )
            )
        self.sweep()
        self._thread = threading.Thread(target=self._run, name="openmaas-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._engine.begin() as conn:
            conn.execute(delete(GatewayRow).where(GatewayRow.id == self.holder))

    def _run(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                with self._engine.begin() as conn:
                    conn.execute(
                        update(GatewayRow).where(GatewayRow.id == self.holder).values(seen_at=datetime.now(UTC))
                    )
                self.sweep()
            except Exception:  # the database may be briefly away; the next turn tries again
                log.warning("could not renew this process's lease", exc_info=True)

    def sweep(self) -> int:
        """Release every open hold taken by a process whose lease lapsed (or that left no lease); returns how
        many."""
        now = datetime.now(UTC)
        stale = now - timedelta(seconds=STALE_S)
        with self._engine.begin() as conn:
            live = select(GatewayRow.id).where(GatewayRow.seen_at >= stale)
            rows = conn.execute(
                select(HoldRow)
                .where(
                    HoldRow.state == "open",
                    HoldRow.holder.is_not(None),
                    HoldRow.holder != self.holder,
                    HoldRow.holder.not_in(live),
                    HoldRow.created_at < stale,
                )
                .limit(1000)
            ).all()
            for r in rows:
                settlement.release_in(conn, PendingCharge(r.id, r.org_id, r.amount_micros, "", None, ""))
            conn.execute(delete(GatewayRow).where(GatewayRow.seen_at < now - FORGET_AFTER))
        if rows:
            log.warning(
                "released the billing holds of gateway processes that stopped without giving them back",
                extra={"holds": len(rows), "holders": sorted({r.holder for r in rows if r.holder})},
            )
        return len(rows)
