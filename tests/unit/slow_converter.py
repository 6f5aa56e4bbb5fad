"""A converter child for the conversion tests: records that it ran, waits, writes its folder."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from openmaas.runtimes.conversion import child_start, report

if __name__ == "__main__":
    child_start()
    source, runs, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    with runs.open("a") as f:
        f.write(f"{os.getpid()}\n")
    report(0.5, "converting")
    time.sleep(float(os.environ.get("SLOW_CONVERTER_SECONDS", "2")))
    out.mkdir()
    (out / "config.json").write_text(source.read_text())
