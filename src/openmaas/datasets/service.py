"""Uploading, describing and deleting datasets (org-private, content-addressed)."""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path, PurePath
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from openmaas.artifacts import LocalArtifactStore
from openmaas.datasets.audio import AudioSet, has_manifest, read_audio
from openmaas.datasets.images import read_images
from openmaas.datasets.parse import TABULAR_FORMATS, read_table
from openmaas.entities.tables import Images, Table
from openmaas.errors import InvalidRequest, NotFound
from openmaas.store.tables import DatasetRow


def format_of(filename: str, declared: str | None) -> str:
    if declared:
        fmt = declared.lower()
    else:
        suffix = PurePath(filename).suffix.lower().lstrip(".")
        fmt = {"ndjson": "jsonl", "json": "jsonl", "zip": "images", "pq": "parquet"}.get(suffix, suffix)
    if fmt not in (*TABULAR_FORMATS, "images", "audio"):
        raise InvalidRequest(
            f"cannot tell a supported dataset format from '{filename}'; send a .csv, .jsonl or .parquet file, a .zip of "
            "class_name/picture.png images, or a .zip of audio files with a file,text CSV manifest (or say which "
            "with 'format')",
            param="format",
        )
    return fmt


def _json(row: DatasetRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "org_id": row.org_id,
        "name": row.name,
        "format": row.format,
        "sha256": row.sha256,
        "size_bytes": row.size_bytes,
        "rows": row.rows,
        "schema": row.schema,
        "created_at": row.created_at.isoformat(),
    }


class DatasetService:
    def __init__(self, sessions: sessionmaker[Session], artifacts: LocalArtifactStore, cache_dir: Path) -> None:
        self._sessions = sessions
        self._artifacts = artifacts
        self._cache_dir = cache_dir

    def upload(self, org_id: str | None, name: str, path: Path, fmt: str) -> dict[str, Any]:
        """Check ``path`` and store it; a file that does not parse is refused with the row/column at fault."""
        if fmt in ("images", "audio") and (fmt == "audio" or has_manifest(path)):
            fmt = "audio"  # a zip with a CSV manifest holds speech, not class folders of pictures
            clips = read_audio(path)
            rows, schema = len(clips.files), clips.schema()
        elif fmt == "images":
            images = read_images(path)
            rows, schema = len(images.labels), images.schema()
        else:
            table = read_table(path, fmt)
            rows, schema = table.rows, table.schema()
        artifact = self._artifacts.put(path)
        row = DatasetRow(
            id=uuid.uuid4().hex,
            org_id=org_id,
            name=name,
            format=fmt,
            sha256=artifact.sha256,
            size_bytes=artifact.size_bytes,
            rows=rows,
            schema=schema,
            created_at=datetime.now(UTC),
        )
        with self._sessions() as s:
            s.add(row)
            s.commit()
            return _json(row)

    def get(self, org_id: str | None, dataset_id: str, *, any_org: bool = False) -> dict[str, Any]:
        with self._sessions() as s:
            row = s.get(DatasetRow, dataset_id)
            if row is None or (not any_org and row.org_id != org_id):
                raise NotFound(
                    f"dataset '{dataset_id}' does not exist or you do not have access to it", param="dataset"
                )
            return _json(row)

    def list(self, org_id: str | None, *, any_org: bool = False) -> list[dict[str, Any]]:
        q = select(DatasetRow).order_by(DatasetRow.created_at)
        if not any_org:
            q = q.where(DatasetRow.org_id == org_id) if org_id else q.where(DatasetRow.org_id.is_(None))
        with self._sessions() as s:
            return [_json(r) for r in s.scalars(q)]

    def table(self, dataset: dict[str, Any]) -> Table:
        if dataset["format"] in ("images", "audio"):
            raise InvalidRequest(
                f"dataset {dataset['id']} holds {dataset['format']}, not a table; use a task for {dataset['format']}",
                param="dataset",
            )
        return read_table(self._artifacts.local_path(dataset["sha256"]), dataset["format"])

    def audio(self, dataset: dict[str, Any]) -> AudioSet:
        if dataset["format"] != "audio":
            raise InvalidRequest(
                f"dataset {dataset['id']} is not speech (a zip of audio files with a file,text CSV manifest)",
                param="dataset",
            )
        return read_audio(self._artifacts.local_path(dataset["sha256"]))

    def images(self, dataset: dict[str, Any]) -> Images:
        if dataset["format"] != "images":
            raise InvalidRequest(f"dataset {dataset['id']} is a table, not images; use a tabular task", param="dataset")
        return read_images(self._artifacts.local_path(dataset["sha256"]))

    def delete(self, org_id: str | None, dataset_id: str, *, any_org: bool = False) -> None:
        """Remove the dataset, its data (unless another dataset holds the same bytes) and derived caches."""
        ds = self.get(org_id, dataset_id, any_org=any_org)
        with self._sessions() as s:
            row = s.get(DatasetRow, dataset_id)
            s.delete(row)
            s.commit()
            shared = s.scalar(select(func.count()).select_from(DatasetRow).where(DatasetRow.sha256 == ds["sha256"]))
        if not shared:
            self._artifacts.delete(ds["sha256"])
        shutil.rmtree(self._cache_dir / dataset_id, ignore_errors=True)
