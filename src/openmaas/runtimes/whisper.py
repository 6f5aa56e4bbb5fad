"""Speech to text: Whisper models in CTranslate2 format, run by faster-whisper."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from openmaas.entities.speech import Segment, Transcript
from openmaas.entities.tensors import Signature, TensorSpec
from openmaas.runtimes.base import Runtime, RuntimeResult, directory_size

SAMPLE_RATE = 16_000

SIGNATURE = Signature(
    inputs=[TensorSpec(name="audio", datatype="BYTES", shape=[-1])],
    outputs=[TensorSpec(name="text", datatype="BYTES", shape=[-1])],
)


class AudioError(ValueError):
    """The upload is not audio this runtime can read (or holds no sound)."""


def decode_audio(data: bytes) -> np.ndarray:
    """Mono float32 samples at 16 kHz from a wav, flac, mp3, ogg (or any format FFmpeg reads) file."""
    from faster_whisper.audio import decode_audio as _decode

    if not data:
        raise AudioError("the audio file is empty")
    try:
        samples = _decode(io.BytesIO(data), sampling_rate=SAMPLE_RATE)
    except Exception as e:
        raise AudioError(f"the file could not be read as audio ({type(e).__name__})") from None
    if samples.size == 0:
        raise AudioError("the audio file holds no samples")
    return np.asarray(samples, dtype=np.float32)


class WhisperRuntime(Runtime):
    """A CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json or vocabulary). Over v2: ``audio``
    BYTES (an encoded file per item) -> ``text``."""

    format = "whisper"
    serves = "speech"
    platform = "ctranslate2"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model: Any = None

    def load(self) -> None:
        from faster_whisper import WhisperModel

        self._model = WhisperModel(
            str(self.path),
            device="cpu",
            compute_type="int8",
            cpu_threads=self.options.torch_threads,
            local_files_only=True,
        )

    @property
    def english_only(self) -> bool:
        return not bool(self._model and self._model.model.is_multilingual)

    @property
    def signature(self) -> Signature:
        return SIGNATURE

    def transcribe(
        self, samples: np.ndarray, language: str | None = None, prompt: str | None = None, temperature: float = 0.0
    ) -> Transcript:
        if self._model is None:
            raise RuntimeError("the whisper model is not loaded")
        temperatures: float | tuple[float, ...] = (
            temperature if temperature > 0 else (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # fall back when greedy loops
        )
        segments, info = self._model.transcribe(
            samples,
            language=language or ("en" if self.english_only else None),
            initial_prompt=prompt or None,
            temperature=temperatures,
            beam_size=5,
            vad_filter=False,
        )
        parts = [Segment(round(s.start, 2), round(s.end, 2), s.text.strip()) for s in segments]
        return Transcript(
            text=" ".join(p.text for p in parts if p.text).strip(),
            language=info.language,
            duration=len(samples) / SAMPLE_RATE,
            segments=parts,
        )

    def infer(self, batch: Mapping[str, np.ndarray]) -> RuntimeResult:
        texts, ms = [], []
        for item in batch["audio"].reshape(-1):
            samples = decode_audio(item if isinstance(item, bytes) else bytes(item))
            transcript = self.transcribe(samples)
            texts.append(transcript.text.encode("utf-8"))
            ms.append(round(transcript.duration * 1000))
        return RuntimeResult(outputs={"text": np.array(texts, dtype=object)}, tokens=np.array(ms, dtype=np.int64))

    def memory_bytes(self) -> int:
        return directory_size(self.path) if self._model is not None else 0

    def unload(self) -> None:
        self._model = None


def is_ctranslate2_whisper(folder: Path) -> bool:
    """A CTranslate2 Whisper folder: model.bin beside a config.json that describes Whisper's tokens."""
    config, weights = folder / "config.json", folder / "model.bin"
    if not weights.is_file() or not config.is_file():
        return False
    with weights.open("rb") as f:
        head = f.read(64)  # CTranslate2: a little-endian format version, then the model spec's name
    if b"WhisperSpec" not in head:
        return False
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and ("suppress_ids" in data or "lang_ids" in data or "alignment_heads" in data)
