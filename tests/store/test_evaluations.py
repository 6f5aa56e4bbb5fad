"""Evaluation reports in the store (SQLite and PostgreSQL): who sees which, the card's figures, comparisons."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, delete

from openmaas.artifacts import LocalArtifactStore
from openmaas.entities.models import ModelCard
from openmaas.entities.tensors import Signature, TensorSpec
from openmaas.errors import NotFound
from openmaas.registry.evaluations import EvaluationService
from openmaas.store.db import session_factory, upgrade
from openmaas.store.registry import RegistryStore
from openmaas.store.tables import ModelVersionRow

SIG = Signature(
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 3])],
    outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 2])],
)
PNG = b"\x89PNG\r\n\x1a\n-not-really-drawn"


def _dataset(sha: str, split: str = "all") -> dict[str, object]:
    return {"id": sha[:8], "name": f"data-{sha[:4]}", "sha256": sha * 8, "rows": 10, "split": split}


def _add(ev: EvaluationService, version: int, org: str | None, dataset: dict[str, object], acc: float) -> str:
    report = ev.add(
        "acme/m",
        version,
        org_id=org,
        job_id=None,
        task="classification",
        dataset=dataset,
        metrics={"accuracy": acc, "confusion_matrix": [[1]], "per_class": {}},
        performance={"latency_p50_ms": 2.0 * version, "parameters": 100 * version, "note": "text"},
        machine={"cpu": "test"},
        plots={"roc": PNG},
    )
    return str(report["id"])


def test_reports_visibility_card_figures_and_comparison(engine: Engine, tmp_path: Path) -> None:
    upgrade(engine)
    sessions = session_factory(engine)
    store = RegistryStore(sessions)
    store.create_model("acme/m", owner_org_id="acme-id", visibility="public")
    for i in range(3):
        store.add_version("acme/m", format="onnx", sha256=f"{i}" * 64, size_bytes=10, signature=SIG, card=ModelCard())
    ev = EvaluationService(sessions, LocalArtifactStore(tmp_path / "artifacts"))

    owners = _add(ev, 1, "acme-id", _dataset("aaaa"), 0.80)
    theirs = _add(ev, 1, "other-id", _dataset("bbbb"), 0.99)  # another org's own data: theirs alone
    assert [r["id"] for r in ev.for_version("acme/m", 1, viewer="other-id", admin=False)] == [theirs, owners]
    assert [r["id"] for r in ev.for_version("acme/m", 1, viewer="third-id", admin=False)] == [owners]
    with pytest.raises(NotFound):
        ev.get("acme/m", 1, theirs, viewer="third-id", admin=False)
    with pytest.raises(NotFound):
        ev.plot("acme/m", 1, theirs, "roc", viewer="third-id", admin=False)
    assert ev.plot("acme/m", 1, owners, "roc", viewer=None, admin=False).read_bytes() == PNG
    with pytest.raises(NotFound, match="has no plot 'residuals'; it has: roc"):
        ev.plot("acme/m", 1, owners, "residuals", viewer=None, admin=False)
    assert ev.measured("acme/m")[1]["evaluation"] == owners  # the card never shows another org's report

    assert ev.compare("acme/m", 1, 2, viewer=None, admin=False)["reason"].startswith("version 2 has no evaluation")
    held_out = _add(ev, 2, "acme-id", _dataset("aaaa", "held-out 0.2 (seed 1)"), 0.9)
    cmp = ev.compare("acme/m", 1, 2, viewer=None, admin=False)
    assert cmp["comparable"] is False and "held-out 0.2 (seed 1)" in cmp["reason"] and "all rows" in cmp["reason"]
    same = _add(ev, 2, None, _dataset("aaaa"), 0.85)
    cmp = ev.compare("acme/m", 1, 2, viewer=None, admin=False)
    assert cmp["comparable"] is True and (cmp["a"]["evaluation"], cmp["b"]["evaluation"]) == (owners, same)
    assert cmp["deltas"]["accuracy"] == pytest.approx(0.05)
    assert cmp["performance"]["parameters"] == {"a": 100.0, "b": 200.0, "delta": 100.0, "ratio": 2.0}
    assert "confusion_matrix" not in cmp["deltas"] and "note" not in cmp["performance"]
    # The other org's report on version 1 is compared only for that org, never silently for others.
    assert ev.measured("acme/m")[2]["evaluation"] == same and held_out != same

    # Reports go with their version.
    with sessions() as s:
        s.execute(delete(ModelVersionRow).where(ModelVersionRow.version == 1))
        s.commit()
    with pytest.raises(NotFound):
        ev.for_version("acme/m", 1, viewer=None, admin=True)
    assert set(ev.measured("acme/m")) == {2}
