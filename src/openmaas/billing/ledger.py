"""The double-entry ledger and the wallets it drives. Every function here runs inside the caller's transaction.

Accounts (all entries of one transaction sum to zero):
    wallet:{org}      prepaid money the org may spend          hold:{org}      money reserved for calls in flight
    funding:{org}     where credits came from (negative)        receivable:{org} what invoices say the org owes (negative)
    revenue:{org}     what a provider org earned ("platform" for platform-owned models)
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import Connection, func, insert, select, update

from openmaas.store.tables import LedgerEntryRow, WalletRow


def wallet(org: str) -> str:
    return f"wallet:{org}"


def hold(org: str) -> str:
    return f"hold:{org}"


def revenue(org: str | None) -> str:
    return f"revenue:{org or 'platform'}"


def post(conn: Connection, kind: str, entries: Sequence[tuple[str, int]], reference: str | None = None) -> str:
    """Append one balanced transaction; refuses an unbalanced one."""
    if sum(amount for _, amount in entries) != 0:
        raise ValueError(f"unbalanced ledger transaction {kind}: {entries}")
    txn = uuid.uuid4().hex
    now = datetime.now(UTC)
    rows = [
        {
            "txn_id": txn,
            "account": account,
            "amount_micros": amount,
            "kind": kind,
            "reference": reference,
            "created_at": now,
        }
        for account, amount in entries
        if amount != 0
    ]
    if rows:
        conn.execute(insert(LedgerEntryRow), rows)
    return txn


def ensure_wallet(conn: Connection, org: str) -> None:
    if conn.execute(select(WalletRow.org_id).where(WalletRow.org_id == org)).first() is None:
        conn.execute(insert(WalletRow).values(org_id=org, available_micros=0, held_micros=0))


def move_to_hold(conn: Connection, org: str, amount: int) -> bool:
    """Reserve ``amount`` if the wallet has it available; one conditional UPDATE, so racing calls cannot both
    take the last of the money, on any database."""
    result = conn.execute(
        update(WalletRow)
        .where(WalletRow.org_id == org, WalletRow.available_micros >= amount)
        .values(
            available_micros=WalletRow.available_micros - amount,
            held_micros=WalletRow.held_micros + amount,
        )
    )
    if result.rowcount != 1:
        return False
    post(conn, "hold", [(wallet(org), -amount), (hold(org), amount)])
    return True


def settle_hold(conn: Connection, org: str, held: int, cost: int, provider: str | None, reference: str) -> None:
    """Turn a hold into a payment of ``cost`` (at most ``held``) and give the rest back."""
    conn.execute(
        update(WalletRow)
        .where(WalletRow.org_id == org)
        .values(
            available_micros=WalletRow.available_micros + (held - cost),
            held_micros=WalletRow.held_micros - held,
        )
    )
    post(conn, "settle", [(hold(org), -held), (wallet(org), held - cost), (revenue(provider), cost)], reference)


def pay(conn: Connection, org: str, cost: int, provider: str | None, reference: str) -> None:
    """A payment of ``cost`` straight from the wallet (no hold left to settle)."""
    conn.execute(
        update(WalletRow).where(WalletRow.org_id == org).values(available_micros=WalletRow.available_micros - cost)
    )
    post(conn, "settle", [(wallet(org), -cost), (revenue(provider), cost)], reference)


def release_hold(conn: Connection, org: str, held: int, reference: str) -> None:
    conn.execute(
        update(WalletRow)
        .where(WalletRow.org_id == org)
        .values(available_micros=WalletRow.available_micros + held, held_micros=WalletRow.held_micros - held)
    )
    post(conn, "release", [(hold(org), -held), (wallet(org), held)], reference)


def balance(conn: Connection, account: str) -> int:
    total = conn.execute(
        select(func.coalesce(func.sum(LedgerEntryRow.amount_micros), 0)).where(LedgerEntryRow.account == account)
    ).scalar_one()
    return int(total)
