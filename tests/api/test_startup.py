"""What the server does once start-up is done, in process with its lifespan."""

from __future__ import annotations

import gc
from pathlib import Path

from starlette.testclient import TestClient

from openmaas.app import create_app
from openmaas.config import Settings


def test_start_up_freezes_what_it_built_out_of_the_collectors_full_passes(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "data", bundled_models=False, admin_key="om_" + "s" * 40))
    gc.unfreeze()  # whatever an earlier test froze
    assert gc.get_freeze_count() == 0
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        # The libraries and the platform's parts no longer count toward (or get walked by) full collections.
        assert gc.get_freeze_count() > 10_000
    gc.unfreeze()
