"""Browser tests: Playwright driving Debian's chromium (launched through its executable_path: browser downloads
are impossible here) against a real server on a free port. ``make test-browser``; screenshots of every page go to
``build/screenshots`` (or ``OPENMAAS_SCREENSHOTS``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess

ADMIN_KEY = "om_browser-admin-key-0123456789abcdefghijklmn"
ROOT = Path(__file__).resolve().parents[2]
AXE = Path(__file__).parent / "vendor" / "axe.min.js"


def chromium_path() -> str:
    for candidate in (os.environ.get("OPENMAAS_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if candidate and Path(candidate).exists():
            return candidate
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("Debian's chromium is required for the browser tests: apt-get install chromium")
    return found


@pytest.fixture(scope="session")
def screenshots() -> Path:
    path = Path(os.environ.get("OPENMAAS_SCREENSHOTS", ROOT / "build" / "screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("browser") / "data"
    proc = ServerProcess(
        data_dir,
        env={
            "OPENMAAS_ADMIN_KEY": ADMIN_KEY,
            # The bundled Gemma converts in the background while the first tests run; the chat test waits for it.
            "OPENMAAS_PREPARE_AT_START": "1",
        },
    )
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def admin_http(console_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=console_server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      timeout=120) as c:  # fmt: skip
        yield c


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()
