"""Dedicated capacity: an organisation reserves a model under a dedicated plan; it is loaded, kept resident while
any reservation (or the operator's settings) needs it, and billed per started minute while reserved.

Each reservation pins the model as its own holder, so stopping one reservation never unpins a model that another
organisation's reservation, the repository API or ``OPENMAAS_PINNED_MODELS`` still needs; and a reservation whose
model cannot be loaded is removed again, so it bills nothing.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Engine, delete, insert, select, update

from openmaas.billing.service import BillingService
from openmaas.entities.models import ModelVersion
from openmaas.errors import AlreadyExists, NotFound
from openmaas.store.tables import ReservationRow

log = logging.getLogger(__name__)


class Pinning(Protocol):
    """What dedicated capacity needs of serving (the serving backend provides it)."""

    async def pin(self, mv: ModelVersion, holder: str) -> None: ...

    def unpin(self, mv: ModelVersion, holder: str) -> None: ...


def holder_of(reservation_id: str) -> str:
    return f"dedicated:{reservation_id}"


class DedicatedCapacity:
    """Start and stop reservations: the reservation rows (what is billed) and the pins (what stays loaded)."""

    def __init__(
        self, engine: Engine, billing: BillingService, serving: Pinning, resolve: Callable[[str], ModelVersion]
    ) -> None:
        self._engine = engine
        self._billing = billing
        self._serving = serving
        self._resolve = resolve
        # reservation id -> the version it pinned (a newer version registered meanwhile is not the pinned one)
        self._pinned: dict[str, ModelVersion] = {}

    async def start(self, org_id: str, model: str, plan_ref: str) -> dict[str, Any]:
        """Reserve ``model`` for ``org_id`` under its dedicated plan ``plan_ref`` and load it; if it cannot be
        loaded the reservation is removed (nothing billed) and the load's error is raised."""
        mv = await asyncio.to_thread(self._resolve, model)
        reservation = await asyncio.to_thread(self._insert, org_id, model, plan_ref)
        rid = reservation["id"]
        try:
            await self._serving.pin(mv, holder_of(rid))
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self._remove, rid))
            raise
        self._pinned[rid] = mv
        return reservation

    async def stop(self, org_id: str, reservation_id: str) -> dict[str, Any]:
        """Stop billing a reservation; its model stays loaded while other holders need it."""
        result = await asyncio.to_thread(self._stop, org_id, reservation_id)
        mv = self._pinned.pop(reservation_id, None)
        if mv is None:  # started by another process or before a restart: it pinned the version current then
            mv = await asyncio.to_thread(self._resolve, result["model"])
        self._serving.unpin(mv, holder_of(reservation_id))
        return result

    # -- the rows -------------------------------------------------------------------------------------------------

    def _insert(self, org_id: str, model: str, plan_ref: str) -> dict[str, Any]:
        plan = next((p for p in self._billing.plans(model, fresh=True) if plan_ref in (p.id, p.spec.name)), None)
        if plan is None or plan.spec.kind != "dedicated":
            raise NotFound(f"model '{model}' has no active dedicated plan '{plan_ref}'", param="plan")
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            running = conn.execute(
                select(ReservationRow.id).where(
                    ReservationRow.org_id == org_id, ReservationRow.model == model, ReservationRow.stopped_at.is_(None)
                )
            ).first()
            if running is not None:
                raise AlreadyExists(f"the organisation already runs dedicated capacity for '{model}'", param="model")
            rid = uuid.uuid4().hex
            conn.execute(
                insert(ReservationRow).values(id=rid, org_id=org_id, plan_id=plan.id, model=model, started_at=now)
            )
        self._billing.forget_entitlements()
        return {"id": rid, "model": model, "plan": plan.spec.name, "started_at": now.isoformat(), "stopped_at": None}

    def _remove(self, reservation_id: str) -> None:
        """Delete a reservation that never served (its model did not load): there is nothing to bill."""
        with self._engine.begin() as conn:
            conn.execute(delete(ReservationRow).where(ReservationRow.id == reservation_id))
        self._billing.forget_entitlements()
        log.info("dedicated capacity removed: its model did not load", extra={"reservation": reservation_id})

    def _stop(self, org_id: str, reservation_id: str) -> dict[str, Any]:
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            row = conn.execute(select(ReservationRow).where(ReservationRow.id == reservation_id)).first()
            if row is None or row.org_id != org_id:
                raise NotFound(f"dedicated capacity '{reservation_id}' does not exist in this organisation", param="id")
            stopped = row.stopped_at or now
            conn.execute(update(ReservationRow).where(ReservationRow.id == reservation_id).values(stopped_at=stopped))
        self._billing.forget_entitlements()
        return {
            "id": reservation_id,
            "model": row.model,
            "started_at": row.started_at.isoformat(),
            "stopped_at": stopped.isoformat(),
        }
