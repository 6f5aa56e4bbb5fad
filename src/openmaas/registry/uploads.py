"""Unpacking uploaded archives (a model folder sent as .zip or .tar.gz) without trusting their paths."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from openmaas.errors import InvalidRequest, PayloadTooLarge

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")


def is_archive(filename: str) -> bool:
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


def _safe_member(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or name.startswith(("/", "\\")):
        raise InvalidRequest(f"the archive has an unsafe path '{name}' (absolute or with '..')", param="file")
    return p


def unpack(archive: Path, dest: Path, *, max_bytes: int) -> Path:
    """Unpack into ``dest`` and return the model folder (the single top folder if there is one)."""
    total = 0
    name = archive.name.lower()
    if name.endswith(".zip"):
        try:
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    rel = _safe_member(info.filename)
                    if info.is_dir():
                        continue
                    total += info.file_size
                    if total > max_bytes:
                        raise PayloadTooLarge(f"the archive unpacks to more than {max_bytes} bytes", param="file")
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, target.open("wb") as out:
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
        except zipfile.BadZipFile as e:
            raise InvalidRequest(f"the upload is not a valid zip archive: {e}", param="file") from None
    else:
        try:
            with tarfile.open(archive) as t:
                for member in t.getmembers():
                    _safe_member(member.name)
                    if member.issym() or member.islnk() or member.isdev():
                        raise InvalidRequest(f"the archive has a link or device entry '{member.name}'", param="file")
                    total += member.size
                    if total > max_bytes:
                        raise PayloadTooLarge(f"the archive unpacks to more than {max_bytes} bytes", param="file")
                t.extractall(dest, filter="data")
        except tarfile.TarError as e:
            raise InvalidRequest(f"the upload is not a valid tar archive: {e}", param="file") from None
    entries = [p for p in dest.iterdir() if not p.name.startswith("__MACOSX")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    if not entries:
        raise InvalidRequest("the archive is empty", param="file")
    return dest
