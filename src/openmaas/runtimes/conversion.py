"""One-time conversions of an artifact (GGUF to safetensors, float32 to int8), run once per target folder in a
child process that reports its progress; the result lands in a folder beside the artifact, atomically."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from openmaas.entities.models import Preparation

log = logging.getLogger(__name__)

_PROGRESS_PREFIX = "openmaas-progress "
_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
# target folder -> (step, fraction done, monotonic start) while a conversion runs
_PROGRESS: dict[Path, tuple[str, float, float]] = {}


def report(fraction: float, step: str) -> None:
    """From inside a converter child: how far it is (read by ``convert_once`` in the parent)."""
    print(f"{_PROGRESS_PREFIX}{fraction:.3f} {step}", flush=True)


def progress(target: Path) -> Preparation | None:
    """The conversion into ``target`` running in this process now, else None."""
    state = _PROGRESS.get(target)
    if state is None:
        return None
    step, fraction, started = state
    return Preparation(step=step, progress=round(fraction, 3), elapsed_s=round(time.monotonic() - started, 1))


def convert_once(target: Path, module: str, args: list[str], what: str, done: str = "config.json") -> Path:
    """Run ``python -m module *args STAGING`` unless ``target/done`` exists, then move STAGING to ``target``.

    One conversion per target in this process (others wait for it); between processes the rename decides (the
    loser's copy is dropped). RuntimeError with the child's last error line when it fails."""
    with _lock(target):
        if (target / done).is_file():
            return target
        return _run(target, module, args, what)


def _lock(target: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(target, threading.Lock())


def _run(target: Path, module: str, args: list[str], what: str) -> Path:
    staging = target.parent / f"{target.name}-staging-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    log.info(f"{what} (once)", extra={"folder": target.name})
    _PROGRESS[target] = ("starting the converter", 0.0, time.monotonic())
    try:
        with tempfile.TemporaryFile("w+") as errors:
            with subprocess.Popen(
                [sys.executable, "-m", module, *args, str(staging)],
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
            ) as child:
                assert child.stdout is not None
                for line in child.stdout:  # "openmaas-progress <fraction> <step>", a line per step
                    if line.startswith(_PROGRESS_PREFIX):
                        fraction, _, step = line[len(_PROGRESS_PREFIX) :].strip().partition(" ")
                        _PROGRESS[target] = (step, float(fraction), _PROGRESS[target][2])
                try:
                    code = child.wait(timeout=3600)
                except subprocess.TimeoutExpired:
                    child.kill()
                    code = child.wait()
            errors.seek(0)
            stderr = errors.read()
    finally:
        _PROGRESS.pop(target, None)
    if code != 0:
        shutil.rmtree(staging, ignore_errors=True)
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(f"{what} failed: {lines[-1] if lines else code}")
    try:
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process converted it first
    log.info(f"{what}: done", extra={"seconds": round(time.perf_counter() - started, 1)})
    return target


def child_start() -> None:
    """The first lines of a converter child: it must not slow the models being served, nor log above errors."""
    os.nice(10)
    logging.disable(logging.WARNING)
