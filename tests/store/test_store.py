"""The same store suite on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, select

from openmaas.entities.models import ModelCard
from openmaas.entities.tensors import Signature, TensorSpec
from openmaas.errors import AlreadyExists, ModelNotFound, Unauthenticated
from openmaas.gateway.auth import KeyAuthenticator
from openmaas.store.db import current_revision, session_factory, upgrade
from openmaas.store.registry import RegistryStore
from openmaas.store.tables import ApiKeyRow

SIG = Signature(
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 3])],
    outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1])],
)


def test_migrations_upgrade_an_empty_database_and_are_idempotent(engine: Engine) -> None:
    assert current_revision(engine) is None
    upgrade(engine)
    tables = set(inspect(engine).get_table_names())
    assert {"models", "model_versions", "api_keys", "platform_state", "alembic_version"} <= tables
    head = current_revision(engine)
    assert head is not None
    upgrade(engine)  # a second run changes nothing and does not fail
    assert current_revision(engine) == head


def test_models_and_versions_round_trip(engine: Engine) -> None:
    upgrade(engine)
    store = RegistryStore(session_factory(engine))
    model = store.create_model("m1", owner_org_id=None, visibility="public")
    assert model.latest_version is None
    with pytest.raises(AlreadyExists):
        store.create_model("m1", owner_org_id=None, visibility="public")
    card = ModelCard(task="tabular-regression", metrics={"r2": 0.5}, license="MIT")
    v1 = store.add_version("m1", format="onnx", sha256="a" * 64, size_bytes=10, signature=SIG, card=card)
    v2 = store.add_version("m1", format="onnx", sha256="b" * 64, size_bytes=20, signature=SIG, card=card)
    assert (v1.version, v2.version) == (1, 2)
    assert store.get_version("m1").sha256 == "b" * 64
    got = store.get_version("m1", 1)
    assert got.signature == SIG and got.card == card and got.created_at.tzinfo is not None
    assert store.get_model("m1").latest_version == 2
    assert [m.name for m in store.list_models()] == ["m1"]
    assert [v.version for v in store.list_versions("m1")] == [1, 2]
    with pytest.raises(ModelNotFound):
        store.get_version("m1", 3)
    with pytest.raises(ModelNotFound):
        store.get_model("nope")


def test_concurrent_registrations_get_distinct_versions(engine: Engine) -> None:
    upgrade(engine)
    store = RegistryStore(session_factory(engine))
    store.create_model("m", owner_org_id=None, visibility="private")
    versions: list[int] = []
    errors: list[BaseException] = []

    def add() -> None:
        try:
            mv = store.add_version("m", format="onnx", sha256="c" * 64, size_bytes=1, signature=SIG, card=ModelCard())
            versions.append(mv.version)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(versions) == [1, 2, 3, 4]


def test_admin_key_is_stored_only_as_a_keyed_hash(engine: Engine, tmp_path: Path) -> None:
    upgrade(engine)
    sessions = session_factory(engine)
    auth = KeyAuthenticator(sessions, b"server-secret")
    key_file = tmp_path / "admin.key"
    generated = auth.ensure_admin_key(None, key_file)
    assert generated is not None and generated.startswith("om_")
    assert key_file.read_text().strip() == generated
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert auth.ensure_admin_key(None, key_file) is None  # not generated twice
    principal = auth.authenticate(generated)
    assert principal.is_platform_admin
    with sessions() as s:
        row = s.scalars(select(ApiKeyRow)).one()
        assert generated not in (row.key_hash, row.prefix, row.name)
        assert row.key_hash == auth.digest(generated)
    with pytest.raises(Unauthenticated):
        auth.authenticate(generated + "x")
    # A configured key replaces the generated one.
    auth.ensure_admin_key("om_configured-key-value-1234567890", key_file)
    with pytest.raises(Unauthenticated):
        KeyAuthenticator(sessions, b"server-secret").authenticate(generated)
    assert KeyAuthenticator(sessions, b"server-secret").authenticate("om_configured-key-value-1234567890")


def test_migration_0006_puts_org_models_in_their_namespace_and_renames_what_refers_to_them(engine: Engine) -> None:
    """An org's ``wine`` becomes ``acme/wine`` with its usage, subscriptions, charges, reservations and jobs; the
    platform's models keep bare names."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from openmaas.store.db import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005")
    now = "2026-11-30 10:00:00"
    with engine.begin() as conn:
        conn.execute(text(f"insert into orgs (id, name, created_at) values ('o1', 'acme', '{now}')"))
        conn.execute(
            text(
                "insert into models (name, owner_org_id, visibility, review_state, created_at) values "
                f"('wine', 'o1', 'private', 'none', '{now}'), ('minilm', null, 'public', 'none', '{now}')"
            )
        )
        conn.execute(
            text(
                "insert into usage_records (request_id, org_id, key_id, model, version, protocol, requests, "
                "input_tokens, output_tokens, items, audio_ms, latency_ms, outcome, created_at, day) values "
                f"('r1', 'o1', 'k1', 'wine', 1, 'v2', 1, 0, 0, 1, 0, 1.0, 'completed', '{now}', '2026-11-30'), "
                f"('r2', 'o1', 'k1', 'minilm', 1, 'openai', 1, 5, 0, 0, 0, 1.0, 'completed', '{now}', '2026-11-30')"
            )
        )
        conn.execute(
            text(
                "insert into jobs (id, org_id, type, spec, status, progress, history, result, attempts, "
                "cancel_requested, created_at) values "
                f"""('j1', 'o1', 'train', '{{"output_model": "wine"}}', 'succeeded', 1, '[]', '{{"model": "wine"}}', """
                f"1, false, '{now}'), "
                f"""('j2', 'o1', 'train', '{{"output_model": "beer"}}', 'queued', 0, '[]', null, 0, false, '{now}')"""
            )
        )
    upgrade(engine)
    with engine.connect() as conn:
        assert sorted(conn.execute(text("select name from models")).scalars()) == ["acme/wine", "minilm"]
        assert dict(conn.execute(text("select request_id, model from usage_records")).all()) == {
            "r1": "acme/wine",
            "r2": "minilm",
        }
    from openmaas.store.tables import JobRow

    with session_factory(engine)() as s:
        jobs = {j.id: j for j in s.scalars(select(JobRow))}
    assert jobs["j1"].spec["output_model"] == "acme/wine" and jobs["j1"].result == {"model": "acme/wine"}
    assert jobs["j2"].spec["output_model"] == "acme/beer"  # queued: its model will be registered in acme's namespace

    # Downgrading returns to global names while no two organisations share one...
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
    with engine.connect() as conn:
        assert sorted(conn.execute(text("select name from models")).scalars()) == ["minilm", "wine"]
        assert conn.execute(text("select model from usage_records where request_id = 'r1'")).scalar_one() == "wine"
    with session_factory(engine)() as s:
        assert s.get(JobRow, "j2").spec["output_model"] == "beer"
    # ... and refuses, saying why, once they do.
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text(f"insert into orgs (id, name, created_at) values ('o2', 'beta', '{now}')"))
        conn.execute(
            text(
                "insert into models (name, owner_org_id, visibility, review_state, created_at) values "
                f"('beta/wine', 'o2', 'private', 'none', '{now}')"
            )
        )
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        with pytest.raises(RuntimeError, match="several organisations have models named wine"):
            command.downgrade(cfg, "0005")
