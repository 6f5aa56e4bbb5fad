"""The model card is documented field by field, served as a JSON Schema, and templated by the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx

from openmaas.entities.models import REQUIRED_FOR_PUBLICATION, ModelCard
from tests.helpers import ServerProcess, matmul_chain_model, register_model, unique

ROOT = Path(__file__).resolve().parents[2]


def test_every_card_field_is_documented_and_described() -> None:
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", (ROOT / "docs" / "model-cards.md").read_text(), re.M))
    assert documented == set(ModelCard.model_fields)
    for name, field in ModelCard.model_fields.items():
        assert field.description, f"card field {name} has no description"


def test_the_schema_is_served_to_anyone(server: ServerProcess) -> None:
    r = httpx.get(server.url + "/api/schemas/model-card.json")
    assert r.status_code == 200, r.text
    schema = r.json()
    assert set(schema["properties"]) == set(ModelCard.model_fields)
    assert all(p["description"] for p in schema["properties"].values())
    assert schema["additionalProperties"] is False
    assert schema["x-required-for-publication"] == list(REQUIRED_FOR_PUBLICATION)


def test_the_cli_template_is_a_card_that_registers(server: ServerProcess, admin: httpx.Client, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "openmaas", "models", "card-template"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    template = json.loads(done.stdout)
    assert set(template) == set(ModelCard.model_fields)
    ModelCard.model_validate(template)
    template.update(task="tabular-regression", license="Apache-2.0")
    path = tmp_path / "m.onnx"
    matmul_chain_model(path, 4)
    name = unique("carded")
    assert register_model(admin, path, name, card=template).status_code == 201
    card = admin.get(f"/api/models/{name}").json()["versions"][0]["card"]
    assert card["license"] == "Apache-2.0" and card["metrics"] == template["metrics"]
    bad = register_model(admin, path, unique("badcard"), card={**template, "metrics": {"accuracy": "high"}})
    assert bad.status_code == 400 and "metrics.accuracy" in bad.json()["detail"]
