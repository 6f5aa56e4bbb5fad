"""SQL implementation of the registry store: rows in, domain objects out."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from openmaas.errors import AlreadyExists, ModelNotFound
from openmaas.registry.models import Model, ModelCard, ModelVersion, ServingConfig, Visibility
from openmaas.runtimes.types import Signature
from openmaas.store.tables import ModelRow, ModelVersionRow, utcnow


def _model(row: ModelRow, latest: int | None) -> Model:
    return Model(
        name=row.name,
        owner_org_id=row.owner_org_id,
        visibility=row.visibility,  # type: ignore[arg-type]
        created_at=row.created_at,
        latest_version=latest,
        serving=ServingConfig.model_validate(row.serving or {}),
    )


def _version(name: str, row: ModelVersionRow) -> ModelVersion:
    return ModelVersion(
        model=name,
        version=row.version,
        format=row.format,
        sha256=row.artifact_sha256,
        size_bytes=row.size_bytes,
        signature=Signature.model_validate(row.signature),
        card=ModelCard.model_validate(row.card),
        created_at=row.created_at,
    )


class RegistryStore:
    """Models and their immutable versions."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def create_model(self, name: str, *, owner_org_id: str | None, visibility: Visibility) -> Model:
        """Create a model with no versions; AlreadyExists if the name is taken."""
        with self._sessions() as s:
            row = ModelRow(name=name, owner_org_id=owner_org_id, visibility=visibility, created_at=utcnow())
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                raise AlreadyExists(f"a model named '{name}' already exists", param="name") from None
            return _model(row, None)

    def set_serving(self, name: str, serving: ServingConfig) -> Model:
        """Replace a model's serving overrides."""
        with self._sessions() as s:
            row = s.scalar(select(ModelRow).where(ModelRow.name == name))
            if row is None:
                raise ModelNotFound(name)
            row.serving = serving.model_dump(exclude_none=True) or None
            s.commit()
        return self.get_model(name)

    def get_model(self, name: str) -> Model:
        with self._sessions() as s:
            row = s.scalar(select(ModelRow).where(ModelRow.name == name))
            if row is None:
                raise ModelNotFound(name)
            latest = s.scalar(select(func.max(ModelVersionRow.version)).where(ModelVersionRow.model_id == row.id))
            return _model(row, latest)

    def list_models(self) -> list[Model]:
        with self._sessions() as s:
            latest = (
                select(ModelVersionRow.model_id, func.max(ModelVersionRow.version).label("latest"))
                .group_by(ModelVersionRow.model_id)
                .subquery()
            )
            rows = s.execute(
                select(ModelRow, latest.c.latest)
                .outerjoin(latest, latest.c.model_id == ModelRow.id)
                .order_by(ModelRow.name)
            ).all()
            return [_model(row, lv) for row, lv in rows]

    def add_version(
        self, name: str, *, format: str, sha256: str, size_bytes: int, signature: Signature, card: ModelCard
    ) -> ModelVersion:
        """Append the next version number; concurrent writers are serialised by the unique constraint."""
        for _attempt in range(5):
            with self._sessions() as s:
                model = s.scalar(select(ModelRow).where(ModelRow.name == name))
                if model is None:
                    raise ModelNotFound(name)
                current = s.scalar(
                    select(func.max(ModelVersionRow.version)).where(ModelVersionRow.model_id == model.id)
                )
                row = ModelVersionRow(
                    model_id=model.id,
                    version=(current or 0) + 1,
                    format=format,
                    artifact_sha256=sha256,
                    size_bytes=size_bytes,
                    signature=signature.model_dump(mode="json"),
                    card=card.model_dump(mode="json"),
                    created_at=utcnow(),
                )
                s.add(row)
                try:
                    s.commit()
                except IntegrityError:
                    s.rollback()
                    continue
                return _version(name, row)
        raise AlreadyExists(f"could not allocate a new version of '{name}': too many concurrent registrations")

    def get_version(self, name: str, version: int | None = None) -> ModelVersion:
        """A given version, or the latest when ``version`` is None."""
        with self._sessions() as s:
            q = select(ModelVersionRow).join(ModelRow, ModelRow.id == ModelVersionRow.model_id)
            q = q.where(ModelRow.name == name)
            if version is None:
                q = q.order_by(ModelVersionRow.version.desc()).limit(1)
            else:
                q = q.where(ModelVersionRow.version == version)
            row = s.scalar(q)
            if row is None:
                raise ModelNotFound(name, version)
            return _version(name, row)

    def list_versions(self, name: str) -> list[ModelVersion]:
        with self._sessions() as s:
            model = s.scalar(select(ModelRow).where(ModelRow.name == name))
            if model is None:
                raise ModelNotFound(name)
            rows = s.scalars(
                select(ModelVersionRow).where(ModelVersionRow.model_id == model.id).order_by(ModelVersionRow.version)
            ).all()
            return [_version(name, r) for r in rows]
