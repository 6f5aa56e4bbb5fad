"""One-time conversions of an artifact (GGUF to safetensors, float32 to int8), run once per target folder in a
child process that reports its progress; the result lands in a folder beside the artifact, or in the conversion
cache under the artifact's digest (``OPENMAAS_CONVERSION_CACHE``), atomically. Processes that share a target (servers
sharing a cache or an artifact store) take turns through a file lock: one converts, the others wait for its result."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from openmaas.entities.models import Preparation

log = logging.getLogger(__name__)

_PROGRESS_PREFIX = "openmaas-progress "
_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
# target folder -> (step, fraction done, monotonic start) while a conversion runs
_PROGRESS: dict[Path, tuple[str, float, float]] = {}
_PR_SET_PDEATHSIG = 1
_DIGEST = re.compile(r"[0-9a-f]{64}")
_CACHE: Path | None = None


def use_cache(folder: Path | str | None) -> None:
    """From now on keep the conversions of stored artifacts under ``folder/<artifact digest>`` (None: beside each
    artifact). Set by whatever builds runtimes from settings: the server, a cluster replica, a model copy's process,
    a job worker."""
    global _CACHE
    _CACHE = Path(folder).resolve() if folder else None


def home(artifact: Path) -> Path:
    """The folder that holds what is made once from ``artifact`` (or from a conversion of it): the artifact's own
    store entry, or its digest's folder in the conversion cache when one is set and the artifact is a stored one
    (``<store>/sha256/<digest>/{blob|tree}``, so the digest names the content and the cache can be shared)."""
    parent = artifact.parent
    if _CACHE is not None and _DIGEST.fullmatch(parent.name):
        return _CACHE / parent.name
    return parent


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

    One conversion per target in this process (others wait for it), and one per target among processes (a file
    lock beside it: a process that finds it taken waits, showing that as its progress, and then uses the result).
    RuntimeError with the child's last error line when it fails."""
    with _lock(target):
        if (target / done).is_file():
            return target
        with _between_processes(target):
            if (target / done).is_file():
                return target
            return _run(target, module, args, what)


def _lock(target: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(target, threading.Lock())


@contextlib.contextmanager
def _between_processes(target: Path) -> Iterator[None]:
    """Hold the file lock of ``target`` (``.<name>.lock`` beside it), waiting for another process that holds it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process converting the same model", extra={"folder": target.name})
            _PROGRESS[target] = ("waiting for another process converting it", 0.0, time.monotonic())
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
            finally:
                _PROGRESS.pop(target, None)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(target: Path, module: str, args: list[str], what: str) -> Path:
    # Holding the target's file lock, no other process converts it: staging folders left by one that died are
    # garbage (a gigabyte each for the bundled model).
    for left in target.parent.glob(f"{target.name}-staging-*"):
        shutil.rmtree(left, ignore_errors=True)
    staging = target.parent / f"{target.name}-staging-{os.getpid()}-{threading.get_ident()}"
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
        shutil.rmtree(staging, ignore_errors=True)  # converted meanwhile by a process that did not take the lock
    log.info(f"{what}: done", extra={"seconds": round(time.perf_counter() - started, 1)})
    return target


def child_start() -> None:
    """The first lines of a converter child: it must not slow the models being served, nor log above errors, nor
    outlive the process that waits for it (a server stopped or killed mid-conversion left it converting for
    minutes, its result never used)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # Linux: die with the parent's thread
    os.nice(10)
    logging.disable(logging.WARNING)
