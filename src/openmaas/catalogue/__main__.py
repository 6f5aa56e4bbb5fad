"""Build and register the missing bundled models: ``python -m openmaas.catalogue`` (settings from OPENMAAS_*).

The server runs this in a child process at first start, so that training and loading happen outside it.
"""

from __future__ import annotations

import os
import sys

from openmaas.artifacts import LocalArtifactStore
from openmaas.catalogue import ensure_catalogue
from openmaas.config import Settings
from openmaas.registry.service import ModelRegistry
from openmaas.runtimes import RuntimeOptions
from openmaas.store import db
from openmaas.store.registry import RegistryStore
from openmaas.telemetry import configure_logging


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    engine = db.create_db_engine(settings.resolved_database_url)
    try:
        options = RuntimeOptions(onnx_threads=settings.onnx_threads, torch_threads=settings.torch_threads)
        registry = ModelRegistry(
            RegistryStore(db.session_factory(engine)), LocalArtifactStore(settings.artifacts_dir), options
        )
        ensure_catalogue(registry, settings.data_dir / "tmp")
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
