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


def test_readme_links_resolve_inside_a_clone() -> None:
    """Every relative link of the README names a file of this repository (a clone has nothing beside it)."""
    readme = (ROOT / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)", readme) if "://" not in t]
    assert targets
    for target in targets:
        path = (ROOT / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"README links to {target}, which a clone lacks"


def test_readme_python_examples_need_only_what_make_serve_installs() -> None:
    """`make serve` installs the package with its `examples` extra: every module the README's Python imports comes
    from the standard library, the package's own dependencies or that extra."""
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["examples"]
    installed_by_serve = {re.split(r"[\[<>=!~ ]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in wanted}
    assert "'.[examples]'" in (ROOT / "Makefile").read_text()
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    modules = {m for b in blocks for m in re.findall(r"^(?:from|import) ([a-zA-Z_][\w]*)", b, re.M)}
    assert {"openai", "tritonclient"} <= modules
    dists = packages_distributions()
    for module in modules - set(sys.stdlib_module_names):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        assert names & installed_by_serve, f"the README imports {module}, which `make serve` does not install"
