"""Image datasets: a zip in image-folder layout (``class_name/picture.png``), checked file by file."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

from openmaas.entities.tables import Images
from openmaas.errors import InvalidRequest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
MAX_IMAGES = 200_000
MAX_SIDE = 512


def _fail(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="file")


def read_images(path: Path) -> Images:
    """Decode every image; they must share one size and colour mode. Problems name the file at fault."""
    from PIL import Image, UnidentifiedImageError

    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise _fail("the file is not a zip archive (image datasets are a zip of class_name/picture.png)") from None
    with archive:
        names = [n for n in archive.namelist() if not n.endswith("/") and not PurePosixPath(n).name.startswith(".")]
        names = [n for n in names if "__MACOSX" not in n]
        if not names:
            raise _fail("the zip is empty")
        parts = [PurePosixPath(n).parts for n in names]
        # Allow one enclosing folder (zip -r data.zip digits/ gives digits/0/a.png).
        roots = {p[0] for p in parts}
        strip = 1 if len(roots) == 1 and all(len(p) == 3 for p in parts) else 0
        if len(parts) > MAX_IMAGES:
            raise _fail(f"the zip holds {len(parts)} files; the limit is {MAX_IMAGES}")
        arrays: list[np.ndarray] = []
        labels: list[str] = []
        size: tuple[int, int] | None = None
        mode: str | None = None
        for name, p in sorted(zip(names, parts, strict=True)):
            rel = p[strip:]
            if len(rel) != 2:
                raise _fail(
                    f"wrong zip layout: '{name}' is not directly inside a class folder (class_name/picture.png)"
                )
            if not rel[1].lower().endswith(IMAGE_SUFFIXES):
                raise _fail(f"'{name}' is not an image file ({', '.join(IMAGE_SUFFIXES)})")
            try:
                with Image.open(io.BytesIO(archive.read(name))) as img:
                    img.load()
                    pic = img.convert("L" if img.mode in ("L", "1", "P", "LA", "I", "I;16") else "RGB")
            except (UnidentifiedImageError, OSError, SyntaxError):
                raise _fail(f"'{name}' is not a readable image (corrupt or truncated)") from None
            if size is None:
                size, mode = pic.size, pic.mode
                if max(size) > MAX_SIDE:
                    raise _fail(f"images are at most {MAX_SIDE} pixels a side; '{name}' is {size[0]}x{size[1]}")
            if pic.size != size or pic.mode != mode:
                raise _fail(
                    f"'{name}' is {pic.size[0]}x{pic.size[1]} {pic.mode}; the first image is {size[0]}x{size[1]} "
                    f"{mode}: all images must share one size and colour mode"
                )
            a = np.asarray(pic, dtype=np.float32) / 255.0
            arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
            labels.append(rel[0])
    classes = sorted(set(labels))
    return Images(np.stack(arrays), labels, classes, mode or "L")
