"""Speech datasets: a zip of audio files with a CSV manifest naming each file and what is said in it."""

from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from openmaas.errors import InvalidRequest

MAX_CLIPS = 20_000


def _fail(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="file")


def has_manifest(path: Path) -> bool:
    """Whether a zip holds a CSV file (speech datasets do; image datasets are folders of pictures)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.lower().endswith(".csv") and "__MACOSX" not in n for n in archive.namelist())
    except zipfile.BadZipFile:
        return False


@dataclass
class AudioSet:
    path: Path
    files: list[str]  # member names in the zip, in manifest order
    transcripts: list[str]

    def read(self, index: int) -> bytes:
        with zipfile.ZipFile(self.path) as archive:
            return archive.read(self.files[index])

    def schema(self) -> dict[str, object]:
        return {"kind": "audio", "clips": len(self.files), "columns": ["file", "text"]}


def read_audio(path: Path) -> AudioSet:
    """Check the manifest (columns ``file`` and ``text``) and that every file it names is in the zip; the
    audio itself is decoded when it is used (a clip that is not audio fails the evaluation naming it)."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise _fail("the file is not a zip archive") from None
    with archive:
        members = [n for n in archive.namelist() if not n.endswith("/") and "__MACOSX" not in n]
        manifests = [n for n in members if n.lower().endswith(".csv")]
        if len(manifests) != 1:
            raise _fail(f"a speech dataset holds one CSV manifest (file,text); this zip holds {len(manifests)}")
        manifest = manifests[0]
        base = PurePosixPath(manifest).parent
        try:
            text = archive.read(manifest).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise _fail(f"the manifest '{manifest}' is not UTF-8 text") from None
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"file", "text"} <= set(reader.fieldnames):
            raise _fail(
                f"the manifest '{manifest}' needs the columns file,text; it has {', '.join(reader.fieldnames or [])}"
            )
        present = set(members)
        files, transcripts = [], []
        for line, row in enumerate(reader, start=2):
            name = str(base / row["file"]) if str(base) != "." else row["file"]
            if name not in present:
                raise _fail(f"line {line} of '{manifest}' names '{row['file']}', which is not in the zip")
            files.append(name)
            transcripts.append(row["text"] or "")
        if not files:
            raise _fail(f"the manifest '{manifest}' lists no clips")
        if len(files) > MAX_CLIPS:
            raise _fail(f"the manifest lists {len(files)} clips; the limit is {MAX_CLIPS}")
    return AudioSet(path, files, transcripts)
