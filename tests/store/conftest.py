"""Store tests run on SQLite and on PostgreSQL (a fresh schema per test on the server CI names)."""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from openmaas.store.db import create_db_engine

PG_URL = os.environ.get("OPENMAAS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@functools.cache
def _postgres_available() -> bool:
    probe = create_engine(PG_URL, connect_args={"connect_timeout": 3}, poolclass=NullPool)
    try:
        with probe.connect() as conn:
            conn.execute(text("select 1"))
        return True
    except Exception:
        return False
    finally:
        probe.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        eng = create_db_engine(f"sqlite:///{tmp_path / 'store.db'}")
        yield eng
        eng.dispose()
        return
    if not _postgres_available():
        if os.environ.get("OPENMAAS_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL at {PG_URL} is required (OPENMAAS_REQUIRE_POSTGRES=1) but unreachable")
        pytest.skip(f"PostgreSQL at {PG_URL} is not reachable")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    eng = create_db_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
    try:
        yield eng
    finally:
        eng.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
