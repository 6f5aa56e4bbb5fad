"""Evaluation reports, stored with the version they measured: listing, plots, the card's measured figures, and
comparing two versions on the same data.

Who sees a report: everyone who can see the model sees the reports its owner (or the platform) ran, which are
what its card shows; a report another organisation ran on its own data is seen by that organisation only.
"""

from __future__ import annotations

import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from openmaas.artifacts import LocalArtifactStore
from openmaas.errors import NotFound
from openmaas.evaluation.metrics import headline
from openmaas.store.tables import EvaluationRow, ModelRow, ModelVersionRow

# Figures compared between versions (besides every numeric task metric): lower is better for all of them.
_PERFORMANCE = ("latency_p50_ms", "latency_p95_ms", "size_bytes", "parameters", "peak_rss_bytes")


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class EvaluationService:
    def __init__(self, sessions: sessionmaker[Session], artifacts: LocalArtifactStore) -> None:
        self._sessions = sessions
        self._artifacts = artifacts

    # -- writing (job workers) -----------------------------------------------------------------------------------

    def add(
        self,
        model: str,
        version: int,
        *,
        org_id: str | None,
        job_id: str | None,
        task: str,
        dataset: dict[str, Any],
        metrics: dict[str, Any],
        performance: dict[str, Any],
        machine: dict[str, Any],
        plots: dict[str, bytes],
    ) -> dict[str, Any]:
        stored: dict[str, str] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, png in plots.items():
                path = Path(tmp) / f"{name}.png"
                path.write_bytes(png)
                stored[name] = self._artifacts.put(path).sha256
        with self._sessions() as s:
            version_id = self._version_id(s, model, version)
            row = EvaluationRow(
                id=uuid.uuid4().hex,
                version_id=version_id,
                org_id=org_id,
                job_id=job_id,
                task=task,
                dataset=dataset,
                dataset_key=f"{dataset['sha256']}:{dataset.get('split', 'all')}",
                metrics=metrics,
                performance=performance,
                machine=machine,
                plots=stored,
                created_at=datetime.now(UTC),
            )
            s.add(row)
            s.commit()
            return self._json(model, version, row)

    # -- reading ---------------------------------------------------------------------------------------------------

    def for_version(self, model: str, version: int, *, viewer: str | None, admin: bool) -> list[dict[str, Any]]:
        """Reports of a version the viewer may see, newest first."""
        with self._sessions() as s:
            rows = self._rows(s, model, version, viewer, admin)
            return [self._json(model, version, r) for r in rows]

    def get(self, model: str, version: int, evaluation_id: str, *, viewer: str | None, admin: bool) -> dict[str, Any]:
        for report in self.for_version(model, version, viewer=viewer, admin=admin):
            if report["id"] == evaluation_id:
                return report
        raise NotFound(f"model '{model}' version {version} has no evaluation '{evaluation_id}'", param="evaluation")

    def plot(self, model: str, version: int, evaluation_id: str, plot: str, *, viewer: str | None, admin: bool) -> Path:
        with self._sessions() as s:
            for row in self._rows(s, model, version, viewer, admin):
                if row.id == evaluation_id:
                    if plot not in row.plots:
                        raise NotFound(
                            f"evaluation '{evaluation_id}' has no plot '{plot}'; it has: "
                            + (", ".join(sorted(row.plots)) or "none"),
                            param="plot",
                        )
                    return self._artifacts.local_path(row.plots[plot])
        raise NotFound(f"model '{model}' version {version} has no evaluation '{evaluation_id}'", param="evaluation")

    def for_job(self, job_id: str) -> dict[str, Any] | None:
        """The report a job stored (a restarted job finds its own instead of measuring twice)."""
        with self._sessions() as s:
            row = s.scalar(select(EvaluationRow).where(EvaluationRow.job_id == job_id))
            if row is None:
                return None
            mv = s.get(ModelVersionRow, row.version_id)
            assert mv is not None
            name = s.scalar(select(ModelRow.name).where(ModelRow.id == mv.model_id))
            return self._json(str(name), mv.version, row)

    def measured(self, model: str) -> dict[int, dict[str, Any]]:
        """Each version's measured figures for its card: the newest report its owner or the platform ran."""
        with self._sessions() as s:
            owner = s.scalar(select(ModelRow.owner_org_id).where(ModelRow.name == model))
            q = (
                select(ModelVersionRow.version, EvaluationRow)
                .join(EvaluationRow, EvaluationRow.version_id == ModelVersionRow.id)
                .join(ModelRow, ModelRow.id == ModelVersionRow.model_id)
                .where(ModelRow.name == model)
                .order_by(EvaluationRow.created_at.desc())
            )
            out: dict[int, dict[str, Any]] = {}
            for version, r in s.execute(q).all():
                if version in out or not (r.org_id is None or r.org_id == owner):
                    continue
                out[version] = {
                    "measured_by": "platform",
                    "evaluation": r.id,
                    "task": r.task,
                    "dataset": r.dataset,
                    "measured_at": r.created_at.isoformat(),
                    "metrics": _scalars(r.metrics),
                    "performance": _scalars(r.performance),
                }
            return out

    def compare(self, model: str, a: int, b: int, *, viewer: str | None, admin: bool) -> dict[str, Any]:
        """The newest reports of ``a`` and ``b`` measured on the same rows of the same data, with deltas (b - a);
        ``comparable`` false, with the reason, when no such pair exists."""
        with self._sessions() as s:
            ra = self._rows(s, model, a, viewer, admin)
            rb = self._rows(s, model, b, viewer, admin)
            out: dict[str, Any] = {"model": model, "a": {"version": a}, "b": {"version": b}}
            for version, rows in ((a, ra), (b, rb)):
                if not rows:
                    return {
                        **out,
                        "comparable": False,
                        "reason": f"version {version} has no evaluation; run an evaluate job on it first",
                    }
            pair = next(((x, y) for x in ra for y in rb if x.dataset_key == y.dataset_key and x.task == y.task), None)
            if pair is None:
                seen = {v: sorted({_dataset_words(r.dataset) for r in rows}) for v, rows in ((a, ra), (b, rb))}
                return {
                    **out,
                    "comparable": False,
                    "reason": f"versions {a} and {b} were never measured on the same data (version {a}: "
                    f"{'; '.join(seen[a])}; version {b}: {'; '.join(seen[b])}); evaluate both on one dataset",
                }
            x, y = pair
            ma, mb = _scalars(x.metrics), _scalars(y.metrics)
            pa, pb = _scalars(x.performance), _scalars(y.performance)
            deltas = {k: mb[k] - ma[k] for k in ma if k in mb}
            performance = {
                k: {"a": pa[k], "b": pb[k], "delta": pb[k] - pa[k], "ratio": (pb[k] / pa[k]) if pa[k] else None}
                for k in (*_PERFORMANCE, *sorted(set(pa) - set(_PERFORMANCE)))
                if k in pa and k in pb
            }
            main = headline(x.task, x.metrics)
            return {
                **out,
                "comparable": True,
                "task": x.task,
                "dataset": x.dataset,
                "a": {"version": a, "evaluation": x.id, "measured_at": x.created_at.isoformat(), "metrics": ma},
                "b": {"version": b, "evaluation": y.id, "measured_at": y.created_at.isoformat(), "metrics": mb},
                "deltas": deltas,
                "performance": performance,
                "headline": (
                    {"metric": main[0], "higher_is_better": main[1], "delta": deltas.get(main[0])} if main else None
                ),
            }

    # -- helpers ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _version_id(s: Session, model: str, version: int) -> int:
        vid = s.scalar(
            select(ModelVersionRow.id)
            .join(ModelRow, ModelRow.id == ModelVersionRow.model_id)
            .where(ModelRow.name == model, ModelVersionRow.version == version)
        )
        if vid is None:
            raise NotFound(f"model '{model}' has no version {version}", param="version")
        return int(vid)

    def _rows(self, s: Session, model: str, version: int, viewer: str | None, admin: bool) -> list[EvaluationRow]:
        owner = s.scalar(select(ModelRow.owner_org_id).where(ModelRow.name == model))
        q = select(EvaluationRow).where(EvaluationRow.version_id == self._version_id(s, model, version))
        rows = list(s.scalars(q.order_by(EvaluationRow.created_at.desc(), EvaluationRow.id)))
        return [r for r in rows if admin or r.org_id is None or r.org_id == owner or (viewer and r.org_id == viewer)]

    @staticmethod
    def _json(model: str, version: int, row: EvaluationRow) -> dict[str, Any]:
        base = f"/api/models/{model}/versions/{version}/evaluations/{row.id}"
        return {
            "id": row.id,
            "model": model,
            "version": version,
            "task": row.task,
            "dataset": row.dataset,
            "metrics": row.metrics,
            "performance": row.performance,
            "machine": row.machine,
            "plots": {name: f"{base}/plots/{name}.png" for name in sorted(row.plots)},
            "job_id": row.job_id,
            "created_at": row.created_at.isoformat(),
        }


def _dataset_words(dataset: dict[str, Any]) -> str:
    split = dataset.get("split", "all")
    return f"{dataset.get('name', dataset['id'])} ({'all rows' if split == 'all' else split})"
