"""Registering models: detect and check the format, load once to read the signature, store, version."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from openmaas.artifacts import ArtifactStore
from openmaas.entities.models import (
    NAME_RE,
    RESERVED_NAMES,
    Model,
    ModelCard,
    ModelVersion,
    ServingConfig,
    Visibility,
    qualify,
    split_name,
)
from openmaas.entities.tensors import Signature
from openmaas.errors import Forbidden, InvalidRequest, ModelLoadFailed, ModelNotFound
from openmaas.registry.inspect import inspect_in_process
from openmaas.registry.publication import Decision, access_changes, review_changes
from openmaas.runtimes import RuntimeOptions
from openmaas.runtimes.formats import detect_format
from openmaas.store.registry import RegistryStore

log = logging.getLogger(__name__)

# (format, path, options) -> signature, by loading the model once; raises InvalidRequest if it does not load.
Inspector = Callable[[str, Path, RuntimeOptions], Signature]

K = TypeVar("K")
V = TypeVar("V")
# How long a resolved "latest version" may be served from memory; bounds staleness across processes.
_CACHE_TTL_S = 2.0


def check_short_name(name: str, param: str = "name") -> None:
    """Refuse a model name that is not 1-128 letters, digits, '.', '_' or '-' (or is a word URLs use)."""
    if not NAME_RE.match(name) or name.lower() in RESERVED_NAMES:
        raise InvalidRequest(
            f"invalid model name '{name}': use 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit, and not one of: {', '.join(sorted(RESERVED_NAMES))}",
            param=param,
        )


def full_name_for(name: str, namespace: str | None, param: str = "name") -> str:
    """The full name under which a caller whose namespace is ``namespace`` (its organisation's name; None for the
    platform's catalogue) registers ``name`` (``"wine"`` or ``"acme/wine"``).

    A name in another namespace is refused with 403 whether or not such a model exists, so registering never
    tells anyone what another organisation has."""
    ns, short = split_name(name)
    check_short_name(short, param)
    if ns is not None and ns != namespace:
        mine = f"'{qualify(namespace, short)}' or just '{short}'" if namespace else f"'{short}'"
        raise Forbidden(f"'{name}' is in the namespace of organisation '{ns}': register yours as {mine}")
    return qualify(namespace, short)


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
        self._refs: dict[str, tuple[float, tuple[str, ...]]] = {}
        # Every model and every latest card (the catalogue lists, searches and filters them on each page).
        self._lists: dict[str, tuple[float, Any]] = {}
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
        """Add ``source`` (file or folder) as the next version of ``name``, creating the model if new.

        ``name`` is the full name (``full_name_for``): ``org/name`` for an organisation's model, bare for the
        platform's."""
        namespace, short = split_name(name)
        check_short_name(short)
        if (namespace is None) != (owner_org_id is None):
            raise InvalidRequest(
                f"'{name}': an organisation's models are named 'org/name', the platform's have no namespace",
                param="name",
            )
        fmt = detect_format(source, format)
        signature = self.inspector(fmt, source, self.options)
        artifact = self.artifacts.put(source)
        try:
            existing = self.store.get_model(name)
        except ModelNotFound:
            self.store.create_model(name, owner_org_id=owner_org_id, visibility=visibility)
        else:
            if existing.owner_org_id != owner_org_id:
                raise Forbidden(f"model '{name}' belongs to another organisation")
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
        return self._cached(self._cache, (name, version), lambda: self.store.get_version(name, version))

    def _cached(self, cache: dict[K, tuple[float, V]], key: K, load: Callable[[], V]) -> V:
        """``load()``, kept in ``cache`` for _CACHE_TTL_S: the request path's lookups cost no query each call."""
        now = time.monotonic()
        hit = cache.get(key)
        if hit is not None and now - hit[0] < _CACHE_TTL_S:
            return hit[1]
        value = load()
        with self._lock:
            if len(cache) > 10_000:
                cache.clear()
            cache[key] = (now, value)
        return value

    def invalidate(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self._cache if k[0] == name]:
                del self._cache[key]
            self._models.pop(name, None)
            self._refs.clear()
            self._lists.clear()

    def find(self, ref: str, namespace: str | None, visible: Callable[[Model], bool]) -> Model:
        """The model a caller in ``namespace`` means by ``ref``, among those ``visible`` to it.

        A full name (``org/name``) is looked up as it is. A bare name means, in order: the caller's own
        organisation's model, the platform's model of that name, then the one model of that name another
        organisation has made visible to the caller (public or shared with it); several such is a 400 that lists
        their full names. ModelNotFound when nothing visible matches, exactly as if nothing existed."""
        if "/" in ref:
            model = self._maybe(ref)
            if model is not None and visible(model):
                return model
            raise ModelNotFound(ref)
        names = self._candidates(ref)
        preferred = ([qualify(namespace, ref)] if namespace else []) + [ref]
        for name in preferred:
            if name in names:
                found = self._maybe(name)
                if found is not None and visible(found):
                    return found
        others = [m for n in names if n not in preferred and (m := self._maybe(n)) is not None and visible(m)]
        if len(others) == 1:
            return others[0]
        if others:
            raise InvalidRequest(
                f"'{ref}' names models of several organisations: use the full name, one of "
                + ", ".join(sorted(m.name for m in others)),
                param="model",
            )
        raise ModelNotFound(ref)

    def _maybe(self, name: str) -> Model | None:
        try:
            return self.cached_model(name)
        except ModelNotFound:
            return None

    def _candidates(self, ref: str) -> tuple[str, ...]:
        """Full names of the models a bare ``ref`` could mean (existing ones only), cached briefly: a miss in
        the caller's own namespace is the common case for platform models and must not cost a query each call."""
        return self._cached(self._refs, ref, lambda: tuple(self.store.names_for(ref)))

    def cached_model(self, name: str) -> Model:
        """The model (owner, visibility, shares), cached briefly for the request path."""
        return self._cached(self._models, name, lambda: self.store.get_model(name))

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

    def set_card(self, name: str, version: int, card: ModelCard) -> ModelVersion:
        """Edit a version's card. A public model's card must stay complete (it was reviewed complete)."""
        model = self.store.get_model(name)
        missing = card.missing_for_publication()
        if (model.visibility == "public" or model.review_state == "pending") and missing:
            raise InvalidRequest(
                f"a public model's card must stay complete; missing: {', '.join(missing)}", param="card"
            )
        updated = self.store.set_card(name, version, card)
        self.invalidate(name)
        return updated

    def set_serving(self, name: str, serving: ServingConfig) -> Model:
        model = self.store.set_serving(name, serving)
        self.invalidate(name)
        return model

    def invalidate_all(self) -> None:
        with self._lock:
            self._cache.clear()
            self._models.clear()
            self._refs.clear()
            self._lists.clear()

    def exists(self, name: str) -> bool:
        try:
            self.store.get_model(name)
        except ModelNotFound:
            return False
        return True

    def list_models(self) -> list[Model]:
        """Every model, cached briefly (a change made here shows at once; other processes' within the TTL)."""
        found: list[Model] = self._cached(self._lists, "models", self.store.list_models)
        return found

    def latest_cards(self) -> dict[str, ModelCard]:
        found: dict[str, ModelCard] = self._cached(self._lists, "cards", self.store.latest_cards)
        return found

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
