"""A small HTTP client for the management API, used by the CLI."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def resolve_key(explicit: str | None, data_dir: Path, *, local: bool = True) -> str | None:
    """The API key: --api-key, then OPENMAAS_API_KEY, then (for the ``local`` server only) the admin key file it
    wrote: the platform-admin key is never sent to another address."""
    if explicit:
        return explicit
    env = os.environ.get("OPENMAAS_API_KEY")
    if env:
        return env
    if not local:
        return None
    key_file = data_dir / "admin.key"
    if key_file.is_file():
        return key_file.read_text().strip()
    return None


class _Reporting(httpx.HTTPTransport):
    """The default transport, with a server that cannot be reached reported as one ``ApiError``."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self._url = url

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return super().handle_request(request)
        except httpx.TransportError as e:
            raise ApiError(
                0, f"cannot reach {self._url} ({type(e).__name__}): is the server running? set --url or OPENMAAS_URL"
            ) from None


class Client:
    def __init__(self, url: str, key: str | None, timeout: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            transport=_Reporting(self.url),
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                body = response.json()
                message = body.get("detail") or body.get("error") or response.text
                if isinstance(message, dict):
                    message = message.get("message", str(message))
            except ValueError:
                message = response.text
            raise ApiError(response.status_code, str(message))
        return response.json() if response.content else None

    def get(self, path: str) -> Any:
        return self._check(self._http.get(path))

    def get_params(self, path: str, params: dict[str, str]) -> Any:
        return self._check(self._http.get(path, params=params))

    def post(self, path: str, json: Any = None) -> Any:
        return self._check(self._http.post(path, json=json))

    def patch(self, path: str, json: Any = None) -> Any:
        return self._check(self._http.patch(path, json=json))

    def put(self, path: str, json: Any = None) -> Any:
        return self._check(self._http.put(path, json=json))

    def delete(self, path: str) -> Any:
        return self._check(self._http.delete(path))

    def upload(self, path: str, file: Path, data: dict[str, str]) -> Any:
        with file.open("rb") as f:
            return self._check(self._http.post(path, data=data, files={"file": (file.name, f)}))

    def download(self, path: str, target: Path) -> int:
        """Stream a response body into ``target``; returns the bytes written."""
        with self._http.stream("GET", path) as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            written = 0
            with target.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    written += len(chunk)
        return written

    def text(self, path: str) -> str:
        response = self._http.get(path)
        if response.status_code >= 400:
            self._check(response)
        return response.text

    def register_model(self, path: Path, name: str, fmt: str | None, card_json: str | None) -> Any:
        """Upload a model file, or a folder zipped on the fly."""
        data: dict[str, str] = {"name": name}
        if fmt:
            data["format"] = fmt
        if card_json:
            data["card"] = card_json
        with tempfile.TemporaryDirectory() as tmp:
            upload = path
            if path.is_dir():
                upload = Path(shutil.make_archive(str(Path(tmp) / path.name), "zip", root_dir=path))
            with upload.open("rb") as f:
                return self._check(self._http.post("/api/models", data=data, files={"file": (upload.name, f)}))
