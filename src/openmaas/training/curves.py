"""Training curves as a PNG (Pillow only): loss and validation loss above, the validation metric below."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_W, _H, _PAD = 720, 480, 48
_COLOURS = {"loss": (31, 119, 180), "val_loss": (255, 127, 14), "val_metric": (44, 160, 44)}


def draw_curves(history: list[dict[str, Any]], path: Path, metric_name: str) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (_W, _H), "white")
    draw = ImageDraw.Draw(img)
    epochs = [h["epoch"] for h in history]
    panels = [(["loss", "val_loss"], "loss", 0), (["val_metric"], f"validation {metric_name}", 1)]
    height = (_H - 3 * _PAD) // 2
    for keys, title, row in panels:
        top = _PAD + row * (height + _PAD)
        left, right, bottom = _PAD + 16, _W - _PAD, top + height
        values = [h[k] for h in history for k in keys if h.get(k) is not None]
        low, high = (min(values), max(values)) if values else (0.0, 1.0)
        if high - low < 1e-12:
            high = low + 1.0
        draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
        draw.text((left, top - 16), f"{title}   (min {low:.4g}, max {high:.4g})", fill="black")
        span = max(1, (epochs[-1] - epochs[0]) if epochs else 1)
        for k in keys:
            points = [
                (
                    left + (right - left) * (h["epoch"] - epochs[0]) / span,
                    bottom - (bottom - top) * (h[k] - low) / (high - low),
                )
                for h in history
                if h.get(k) is not None
            ]
            if len(points) > 1:
                draw.line(points, fill=_COLOURS[k], width=2)
            draw.text((right - 90, top + 4 + 12 * keys.index(k)), k, fill=_COLOURS[k])
        draw.text((left, bottom + 4), f"epoch {epochs[0] if epochs else 0}", fill="black")
        draw.text((right - 70, bottom + 4), f"epoch {epochs[-1] if epochs else 0}", fill="black")
    img.save(path, format="PNG")
