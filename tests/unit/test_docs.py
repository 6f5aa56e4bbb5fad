"""Documentation that users rely on stays true."""

from __future__ import annotations

import re
from pathlib import Path

from openmaas.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_documented() -> None:
    documented = set(re.findall(r"`(OPENMAAS_[A-Z_]+)`", (ROOT / "docs" / "settings.md").read_text()))
    expected = {f"OPENMAAS_{name.upper()}" for name in Settings.model_fields}
    assert expected - documented == set(), "settings missing from docs/settings.md"
    assert documented - expected == set(), "docs/settings.md names settings that do not exist"


def test_readme_quick_start_uses_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make serve" in readme
    assert "make test" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve:", makefile, re.M)
    assert re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
