"""Cluster-mode settings that cannot work are one line at `openmaas serve`, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"OPENMAAS_BACKEND": "ray"}, "OPENMAAS_BACKEND=ray needs OPENMAAS_REDIS_URL"),
        ({"OPENMAAS_ARTIFACTS_URL": "s3://bucket/artifacts"}, "only a folder or a file:// URL"),
    ],
)
def test_serve_refuses_settings_that_cannot_work_in_one_line(tmp_path: Path, env: dict[str, str], words: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "openmaas", "serve", "--port", "0", "--data-dir", str(tmp_path / "data")],
        env={**os.environ, "OPENMAAS_GRPC_PORT": "0", "OPENMAAS_BUNDLED_MODELS": "false", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
