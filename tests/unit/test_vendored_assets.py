"""The console's browser assets are vendored: each file matches the sha256 its manifest records, and no template
or script loads anything from another origin (the console works air-gapped)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = ROOT / "src/openmaas/console"


def test_every_vendored_file_matches_its_manifest() -> None:
    run = subprocess.run([sys.executable, "scripts/vendor_assets.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr


def test_a_changed_vendored_file_is_caught(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import vendor_assets
    finally:
        sys.path.pop(0)
    manifest = tmp_path / "vendor.json"
    (tmp_path / "a.js").write_text("console.log(1)")
    manifest.write_text('[{"file": "a.js", "package": "p", "version": "1", "source": "a.js", "sha256": "00"}]')
    assert vendor_assets.check(manifest) == [f"{tmp_path / 'a.js'}: sha256 differs from vendor.json (p 1)"]


def test_no_template_or_console_script_loads_from_another_origin() -> None:
    pattern = re.compile(r"""(src|href)\s*=\s*["'](https?:)?//""")
    for path in [*CONSOLE.glob("templates/*.html"), *CONSOLE.glob("static/*.js"), *CONSOLE.glob("static/*.css")]:
        text = path.read_text()
        assert not pattern.search(text), path
        assert "<script>" not in text and not re.search(r"\son[a-z]+\s*=", text), path  # no inline script
