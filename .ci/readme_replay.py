"""Replay the README's quick start on a fresh clone, exactly as written.

Clones this repository's HEAD into a temporary folder, runs the quick start's ``make serve`` in the background
(it creates the venv and installs what the README says it installs), waits for the server, then runs the quick
start's shell and Python blocks in order, in one shell, as a reader pasting them would. Fails (exit 1) on any
command that fails, on any curl answer that is an error, and on a Python example that raises.

Only the standard library: it runs before anything is installed. Needs port 8000 free (the README's port).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
URL = "http://127.0.0.1:8000"
SERVE_TIMEOUT_S = 1200  # the first `make serve` creates the venv and installs torch and the rest


def quick_start_blocks(readme: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block in the Quick start section, in order."""
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [(lang, code) for lang, code in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_for_server(clone: Path, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"make serve exited with {server.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            with urllib.request.urlopen(URL + "/healthz", timeout=2) as r:
                if r.status == 200 and (clone / ".openmaas" / "admin.key").exists():
                    return
        except OSError:
            pass
        time.sleep(2)
    sys.exit(f"the server did not come up in {SERVE_TIMEOUT_S} s:\n{log.read_text(errors='replace')[-4000:]}")


def script_for(blocks: list[tuple[str, str]]) -> str:
    """One bash script: the shell blocks as written, each Python block as ``python - <<'PY'``, curl answers
    checked to be JSON that is not an error."""
    lines = ["set -eo pipefail"]
    for lang, code in blocks[1:]:  # blocks[0] is `make serve` / `make test`, run separately
        if lang == "bash":
            for line in code.splitlines():
                if line.startswith("curl ") or (line.startswith("  ") and lines[-1].endswith("\\")):
                    lines.append(line)
                    if not line.endswith("\\"):
                        # The checker prints the answer (tee /dev/stderr would truncate a log file it points at).
                        lines[-1] = line + ' | python -c "$CHECK_JSON"'
                else:
                    lines.append(line)
        elif lang == "python":
            lines += ["python - <<'PY'", code.rstrip("\n"), "PY"]
        else:
            sys.exit(f"the quick start has a {lang} block this replay does not know how to run")
    return "\n".join(lines) + "\n"


CHECK_JSON = """
import json, sys
text = sys.stdin.read()
print(text)
body = json.loads(text)
if isinstance(body, dict) and ("error" in body or body.get("status", 200) >= 400):
    sys.exit(f"the answer is an error: {body}")
"""


def main() -> None:
    blocks = quick_start_blocks((ROOT / "README.md").read_text())
    setup = blocks[0][1]
    serve = next((line.split("#")[0].strip() for line in setup.splitlines() if line.startswith("make serve")), None)
    if serve is None:
        sys.exit("the quick start's first block has no `make serve`")
    if not port_free(8000):
        sys.exit("port 8000 is in use: the README's examples talk to :8000, stop what listens there first")
    work = Path(tempfile.mkdtemp(prefix="readme-replay-"))
    clone = work / "openmaas"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    log = work / "serve.log"
    print(f"replaying the README in {clone}: `{serve}` (log: {log})", flush=True)
    started = time.monotonic()
    with log.open("wb") as out:
        server = subprocess.Popen(
            serve, shell=True, cwd=clone, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_server(clone, server, log)
        print(f"server up after {time.monotonic() - started:.0f} s", flush=True)
        # The speech example reads speech.wav: the README says how to make one.
        subprocess.run(["espeak-ng", "-w", "speech.wav", "Hello from the README."], cwd=clone, check=True)
        script = script_for(blocks)
        (work / "replay.sh").write_text(script)
        done = subprocess.run(
            ["bash", str(work / "replay.sh")],
            cwd=clone,
            env={**os.environ, "CHECK_JSON": CHECK_JSON, "PYTHONUNBUFFERED": "1"},
            timeout=900,
        )
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            sys.exit(f"a README example failed (exit {done.returncode}); server log tail:\n{tail}")
        print(json.dumps({"readme_replay": "ok", "seconds": round(time.monotonic() - started)}), flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
