"""SQL implementation of the registry store: rows in, domain objects out."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from openmaas.entities.models import Model, ModelCard, ModelVersion, ReviewState, ServingConfig, Visibility
from openmaas.entities.tensors import Signature
from openmaas.errors import AlreadyExists, ModelNotFound
from openmaas.store.tables import ModelRow, ModelShareRow, ModelVersionRow, utcnow


def _model(row: ModelRow, latest: int | None, shared_with: list[str] | None = None) -> Model:
    return Model(
        name=row.name,
        owner_org_id=row.owner_org_id,
        visibility=row.visibility,  # type: ignore[arg-type]
        created_at=row.created_at,
        latest_version=latest,
        serving=ServingConfig.model_validate(row.serving or {}),
        shared_with=tuple(sorted(shared_with or ())),
        review_state=row.review_state,  # type: ignore[arg-type]
        review_reason=row.review_reason,
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


def _latest_versions() -> Any:
    """A subquery: each model's id and its latest version number."""
    return (
        select(ModelVersionRow.model_id, func.max(ModelVersionRow.version).label("latest"))
        .group_by(ModelVersionRow.model_id)
        .subquery()
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

    def update_access(
        self,
        name: str,
        *,
        visibility: Visibility | None = None,
        shared_with: list[str] | None = None,
        review_state: ReviewState | None = None,
        review_reason: str | None = None,
    ) -> Model:
        """Change who may see a model: visibility, the orgs it is shared with, the state of its review."""
        with self._sessions() as s:
            row = s.scalar(select(ModelRow).where(ModelRow.name == name))
            if row is None:
                raise ModelNotFound(name)
            if visibility is not None:
                row.visibility = visibility
            if review_state is not None:
                row.review_state = review_state
                row.review_reason = review_reason
            if shared_with is not None:
                s.execute(delete(ModelShareRow).where(ModelShareRow.model_id == row.id))
                s.add_all([ModelShareRow(model_id=row.id, org_id=org) for org in sorted(set(shared_with))])
            s.commit()
        return self.get_model(name)

    def get_model(self, name: str) -> Model:
        with self._sessions() as s:
            row = s.scalar(select(ModelRow).where(ModelRow.name == name))
            if row is None:
                raise ModelNotFound(name)
            latest = s.scalar(select(func.max(ModelVersionRow.version)).where(ModelVersionRow.model_id == row.id))
            shares = list(s.scalars(select(ModelShareRow.org_id).where(ModelShareRow.model_id == row.id)))
            return _model(row, latest, shares)

    def names_for(self, short: str) -> list[str]:
        """Full names whose own part is ``short``: the platform's ``short`` and every ``org/short``."""
        with self._sessions() as s:
            return list(
                s.scalars(
                    select(ModelRow.name).where(
                        (ModelRow.name == short) | ModelRow.name.endswith("/" + short, autoescape=True)
                    )
                )
            )

    def list_models(self) -> list[Model]:
        with self._sessions() as s:
            latest = _latest_versions()
            rows = s.execute(
                select(ModelRow, latest.c.latest)
                .outerjoin(latest, latest.c.model_id == ModelRow.id)
                .order_by(ModelRow.name)
            ).all()
            shares: dict[int, list[str]] = {}
            for model_id, org in s.execute(select(ModelShareRow.model_id, ModelShareRow.org_id)):
                shares.setdefault(model_id, []).append(org)
            return [_model(row, lv, shares.get(row.id)) for row, lv in rows]

    def set_card(self, name: str, version: int, card: ModelCard) -> ModelVersion:
        """Replace the card of one version (its artifact and signature never change)."""
        with self._sessions() as s:
            row = s.scalar(
                select(ModelVersionRow)
                .join(ModelRow, ModelRow.id == ModelVersionRow.model_id)
                .where(ModelRow.name == name, ModelVersionRow.version == version)
            )
            if row is None:
                raise ModelNotFound(name, version)
            row.card = card.model_dump(mode="json")
            s.commit()
            return _version(name, row)

    def latest_cards(self) -> dict[str, ModelCard]:
        """Every model's latest card, by model name, in one query (the catalogue lists, searches and filters on
        them)."""
        with self._sessions() as s:
            latest = _latest_versions()
            rows = s.execute(
                select(ModelRow.name, ModelVersionRow.card)
                .join(latest, latest.c.model_id == ModelRow.id)
                .join(
                    ModelVersionRow,
                    (ModelVersionRow.model_id == ModelRow.id) & (ModelVersionRow.version == latest.c.latest),
                )
            ).all()
        return {name: ModelCard.model_validate(card) for name, card in rows}

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
