"""Registering models: detect and check the format, load once to read the signature, store, version."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openmaas.artifacts import ArtifactStore
from openmaas.entities.models import Model, ModelCard, ModelVersion, ServingConfig, Visibility
from openmaas.entities.tensors import Signature
from openmaas.errors import AlreadyExists, Forbidden, InvalidRequest, ModelLoadFailed, ModelNotFound
from openmaas.registry.inspect import inspect_in_process
from openmaas.registry.publication import Decision, access_changes, review_changes
from openmaas.runtimes import RuntimeOptions
from openmaas.runtimes.formats import detect_format
from openmaas.store.registry import RegistryStore

log = logging.getLogger(__name__)

# (format, path, options) -> signature, by loading the model once; raises InvalidRequest if it does not load.
Inspector = Callable[[str, Path, RuntimeOptions], Signature]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# How long a resolved "latest version" may be served from memory; bounds staleness across processes.
_CACHE_TTL_S = 2.0


class ModelRegistry:
    """The registry domain service used by the gateway and the management API."""

    def __init__(
        self,
        store: RegistryStore,
        artifacts: ArtifactStore,
        options: RuntimeOptions,
        inspector: Inspector = inspect_in_process,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.options = options
        self.inspector = inspector
        self._cache: dict[tuple[str, int | None], tuple[float, ModelVersion]] = {}
        self._models: dict[str, tuple[float, Model]] = {}
        self._lock = threading.Lock()

    def register(
        self,
        source: Path,
        name: str,
        *,
        format: str | None = None,
        card: ModelCard | None = None,
        owner_org_id: str | None = None,
        visibility: Visibility = "private",
    ) -> ModelVersion:
        """Add ``source`` (file or folder) as the next version of ``name``, creating the model if new."""
        if not NAME_RE.match(name):
            raise InvalidRequest(
                f"invalid model name '{name}': use 1-128 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit",
                param="name",
            )
        fmt = detect_format(source, format)
        signature = self.inspector(fmt, source, self.options)
        artifact = self.artifacts.put(source)
        try:
            self.store.get_model(name)
        except ModelNotFound:
            self.store.create_model(name, owner_org_id=owner_org_id, visibility=visibility)
        version = self.store.add_version(
            name,
            format=fmt,
            sha256=artifact.sha256,
            size_bytes=artifact.size_bytes,
            signature=signature,
            card=card or ModelCard(),
        )
        self.invalidate(name)
        log.info("model registered", extra={"model": name, "version": version.version, "format": fmt})
        return version

    def resolve(self, name: str, version: int | None = None) -> ModelVersion:
        """The version to serve (latest when None), cached briefly for the request path."""
        key = (name, version)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < _CACHE_TTL_S:
            return hit[1]
        mv = self.store.get_version(name, version)
        with self._lock:
            self._cache[key] = (now, mv)
        return mv

    def invalidate(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self._cache if k[0] == name]:
                del self._cache[key]
            self._models.pop(name, None)

    def cached_model(self, name: str) -> Model:
        """The model (owner, visibility, shares), cached briefly for the request path."""
        now = time.monotonic()
        hit = self._models.get(name)
        if hit is not None and now - hit[0] < _CACHE_TTL_S:
            return hit[1]
        model = self.store.get_model(name)
        with self._lock:
            self._models[name] = (now, model)
        return model

    def update_access(self, name: str, **changes: Any) -> Model:
        model = self.store.update_access(name, **changes)
        self.invalidate(name)
        return model

    def change_access(
        self, name: str, *, visibility: Visibility | None, shared_with: list[str] | None, by_admin: bool
    ) -> Model:
        """Apply a visibility or sharing change (``shared_with``: organisation ids); see ``publication``."""
        model = self.store.get_model(name)
        card = self.store.get_version(name, None).card
        changes = access_changes(model, card, visibility=visibility, shared_with=shared_with, by_admin=by_admin)
        return self.update_access(name, **changes) if changes else model

    def review(self, name: str, decision: Decision, reason: str) -> Model:
        """The platform admin approves or rejects a model's pending request to be public."""
        return self.update_access(name, **review_changes(self.store.get_model(name), decision, reason))

    def check_new_name(self, name: str, owner_org_id: str | None, *, visible: bool, by_admin: bool) -> None:
        """Refuse to register ``name`` for ``owner_org_id`` when another organisation owns it (409 when the caller
        cannot see that model, so its existence is not revealed beyond the name being taken; else 403)."""
        try:
            existing = self.store.get_model(name)
        except ModelNotFound:
            return
        if by_admin or existing.owner_org_id == owner_org_id:
            return
        if not visible:
            raise AlreadyExists(f"the model name '{name}' is taken; choose another", param="name")
        raise Forbidden(f"model '{name}' belongs to another organisation; register yours under another name")

    def set_serving(self, name: str, serving: ServingConfig) -> Model:
        model = self.store.set_serving(name, serving)
        self.invalidate(name)
        return model

    def invalidate_all(self) -> None:
        with self._lock:
            self._cache.clear()
            self._models.clear()

    def exists(self, name: str) -> bool:
        try:
            self.store.get_model(name)
        except ModelNotFound:
            return False
        return True

    def list_models(self) -> list[Model]:
        return self.store.list_models()

    def get_model(self, name: str) -> Model:
        return self.store.get_model(name)

    def list_versions(self, name: str) -> list[ModelVersion]:
        return self.store.list_versions(name)

    def artifact_path(self, mv: ModelVersion) -> Path:
        try:
            return self.artifacts.local_path(mv.sha256)
        except FileNotFoundError:
            raise ModelLoadFailed(
                f"the artifact of {mv.model} version {mv.version} is missing from the artifact store"
            ) from None
