"""Starting a real ``openmaas serve`` process on a free port for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A server in its own process; fails at once if the process dies, always stopped by ``stop``."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"
        # Test servers do not convert the bundled GGUF model at start (a minute of CPU each) unless asked to.
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OPENMAAS_LOG_LEVEL": "info",
            "OPENMAAS_PREPARE_AT_START": "0",
            "OPENMAAS_GRPC_PORT": "0",  # gRPC off unless a test asks for it (a fixed port would clash)
            **(env or {}),
        }
        self.grpc_port = int(self.env["OPENMAAS_GRPC_PORT"])
        self.proc: subprocess.Popen[bytes] | None = None
        # What the server said right after it started (filled in by fixtures that look).
        self.first_look: dict[str, Any] = {}

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "openmaas", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become ready in {timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers run (a crash)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def matmul_chain_model(path: Path, n: int, depth: int = 1, seed: int = 0) -> None:
    """An ONNX model multiplying x (B,n) by one n x n matrix ``depth`` times: real work, small on disk."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (np.eye(n) + np.random.default_rng(seed).standard_normal((n, n)) / (10 * n)).astype(np.float32)
    names = ["x"] + [f"h{i}" for i in range(depth - 1)] + ["y"]
    nodes = [helper.make_node("MatMul", [names[i], "w"], [names[i + 1]]) for i in range(depth)]
    graph = helper.make_graph(
        nodes,
        "matmul_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def unique(prefix: str) -> str:
    """A name no other test (or earlier run against the same database) uses."""
    import uuid

    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_org(admin: httpx.Client, prefix: str = "org") -> dict:
    r = admin.post("/api/orgs", json={"name": unique(prefix)})
    assert r.status_code == 201, r.text
    return dict(r.json())


def new_key(client: httpx.Client, org: str, **body: object) -> dict:
    """Create an API key in ``org``; the response carries the secret under "key"."""
    r = client.post(f"/api/orgs/{org}/keys", json={"name": unique("key"), **body})
    assert r.status_code == 201, r.text
    return dict(r.json())


def register_model(
    client: httpx.Client, path: Path, name: str, card: dict | None = None, timeout: float | None = None
) -> httpx.Response:
    """Upload a model file (or a folder's .zip) through the management API."""
    import json

    data = {"name": name}
    if card is not None:
        data["card"] = json.dumps(card)
    with path.open("rb") as f:
        if timeout is None:
            return client.post("/api/models", data=data, files={"file": (path.name, f)})
        return client.post("/api/models", data=data, files={"file": (path.name, f)}, timeout=timeout)
