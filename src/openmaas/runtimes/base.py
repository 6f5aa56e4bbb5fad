"""The small contract every runtime implements: load, infer(batch), signature, memory_bytes, unload."""

from __future__ import annotations

import ctypes
import importlib
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from openmaas.entities.models import Preparation
from openmaas.entities.tensors import Signature


def route_library_logs() -> None:
    """transformers writes its warnings through a handler of its own (``[transformers] ...`` as raw text on
    stderr); send them through the root logger instead, so the server's log stays one JSON object a line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


@dataclass(frozen=True)
class RuntimeOptions:
    """Resources a runtime may use; built from Settings by the composition root."""

    onnx_threads: int = 1
    torch_threads: int = 1
    #: Text generation: requests decoded together, the longest context served, the default answer length.
    generation_batch: int = 8
    generation_context: int = 8192
    generation_max_tokens: int = 256
    generation_queue: int = 64
    #: Language models' weights in memory: ``int8`` (quantised, float32 where the quality guard or the engine
    #: refuses), ``int8-forced`` (quantised even past the quality guard) or ``float32``.
    generation_weights: str = "int8"
    #: Serve each copy of a runtime that asks for it (``Runtime.own_process``) in a child process.
    copy_processes: bool = False
    #: Where one-time conversions go (``runtimes/conversion.py``, ``use_cache``); None: beside each artifact.
    conversion_cache: str | None = None


@dataclass
class RuntimeResult:
    """Named output arrays (batch first) plus, for text models, the tokens each item used."""

    outputs: dict[str, np.ndarray]
    tokens: np.ndarray | None = field(default=None)


class Runtime(ABC):
    """A loaded model. Receives arrays and strings, returns arrays; knows nothing of HTTP or tenants."""

    #: Format name as stored in the registry (``onnx``, ``sentence-transformers``, ``skops``).
    format: str = ""
    #: Platform string shown in Open Inference Protocol model metadata.
    platform: str = ""
    #: What the model is served for: ``tensor`` (v2 inference only), ``embedding``, ``generation`` or ``speech``.
    serves: str = "tensor"
    #: Modules that loading a model of this format imports and that take seconds to import; the server imports
    #: them in the background once a model of the format is registered or found at start, so that a first call
    #: does not wait for them (and a loaded model's measured memory is its own, not its libraries').
    libraries: tuple[str, ...] = ()

    def __init__(self, path: Path, options: RuntimeOptions) -> None:
        self.path = path
        self.options = options

    @classmethod
    def static_signature(cls, path: Path) -> Signature | None:
        """The signature without loading the model (cheap checks only), for formats whose signature is fixed and
        whose first load is slow; None: registration loads the model to read it."""
        return None

    @classmethod
    def prepare(cls, path: Path, options: RuntimeOptions) -> bool:
        """Slow one-time work that makes an artifact ready to load (a conversion), run off the request path;
        True when it did that work now, False when there was none to do."""
        return False

    @classmethod
    def needs_preparation(cls, path: Path, options: RuntimeOptions) -> bool:
        """Whether ``prepare`` still has work to do for the artifact at ``path``."""
        return False

    @classmethod
    def prepared_weights(cls, path: Path, options: RuntimeOptions) -> dict[str, object] | None:
        """How the artifact's weights are held when served (say, int8 and the quality guard's figures), once
        known; None for formats served as stored."""
        return None

    @classmethod
    def is_set_up(cls) -> bool:
        """Whether this process has nothing left to set up for the format (``set_up_process``)."""
        return cls in _SET_UP or (not cls.libraries and cls._set_up.__func__ is Runtime._set_up.__func__)  # type: ignore[attr-defined]

    @classmethod
    def set_up_process(cls) -> None:
        """The one-time, process-wide work a format's first load would otherwise do inside it: importing its
        ``libraries`` and starting them (``_set_up``). The pool runs it before it measures a load, so that a model
        is charged its own memory only (ONNX Runtime's import and environment made the first ONNX load in a
        process read 3.8 times its file). Once per process and format; thread-safe."""
        if cls.is_set_up():
            return
        with _SET_UP_LOCK:
            if cls not in _SET_UP:
                for name in cls.libraries:
                    importlib.import_module(name)
                cls._set_up()
                _SET_UP.add(cls)

    @classmethod  # noqa: B027 - optional hook, default does nothing
    def _set_up(cls) -> None:
        """Start the format's libraries once in this process (beyond importing ``libraries``)."""

    @classmethod
    def preparing(cls, path: Path) -> Preparation | None:
        """The preparation of ``path`` running now in this process (step and progress), else None."""
        return None

    @classmethod
    def token_estimate(cls, batch: Mapping[str, np.ndarray], path: Path) -> tuple[int, int] | None:
        """(expected, at most) tokens the model at ``path`` will read of the batch's text, for costs and limits
        (without loading it); None: not a text model."""
        return None

    def begin_load(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Start the slow part of loading that may overlap other copies' (a child process importing its libraries);
        ``load`` finishes it. Called, when at all, just before ``load`` on the same thread."""

    @abstractmethod
    def load(self) -> None:
        """Read the artifact into memory; after this ``signature`` and ``infer`` work."""

    @property
    @abstractmethod
    def signature(self) -> Signature:
        """Inputs and outputs, batch dimension first (-1)."""

    @abstractmethod
    def infer(self, batch: Mapping[str, np.ndarray]) -> RuntimeResult:
        """Compute outputs for a batch of validated inputs (every array shares the first dimension)."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Estimated resident memory of the loaded model."""

    def parameters(self) -> int | None:
        """Weights the loaded model holds (for evaluation reports); None where the format does not tell."""
        return None

    #: Served in a process of its own per copy (``runtimes/process.py``) when the options allow: copies as threads
    #: of one process share its interpreter lock, which a PyTorch forward pass over a few rows holds for most of
    #: its time.
    own_process: ClassVar[bool] = False
    #: True when the intra-op threads ``set_threads`` asks for are an OpenMP team of the calling thread (PyTorch).
    #: Each thread that runs such a team keeps one, and once the process holds more OpenMP threads than cores,
    #: GNU OpenMP stops spinning between parallel regions: every region then waits for its workers to wake, and a
    #: lone request took twice as long for as long as the process lived. The pool therefore runs every
    #: multi-threaded call of such a runtime on one thread of the process (``CoreShare.wide``), and a copy's own
    #: thread only ever runs it on one thread.
    threads_follow_caller: ClassVar[bool] = False

    def set_threads(self, threads: int) -> None:  # noqa: B027 - optional hook, default does nothing
        """Use ``threads`` intra-op threads from now on (called on the thread that runs the next call; optional)."""

    @abstractmethod
    def unload(self) -> None:
        """Release the model's memory; the object may be loaded again."""


_SET_UP: set[type[Runtime]] = set()
_SET_UP_LOCK = threading.Lock()


def directory_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def process_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def settled_rss() -> int:
    """This process's resident set size once the C allocator has given its free pages back to the system (glibc's
    ``malloc_trim``; plain :func:`process_rss` elsewhere). Freed memory that the allocator keeps counts in the plain
    figure, so two plain readings around a load measure the load plus whatever was freed or reused meanwhile.
    Takes milliseconds (it walks every allocator arena): call it off the event loop."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    return process_rss()


def can_settle_rss() -> bool:
    """Whether :func:`settled_rss` returns freed memory first (else it is a plain reading)."""
    return _MALLOC_TRIM is not None
