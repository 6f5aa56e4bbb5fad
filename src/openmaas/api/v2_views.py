"""What the v2 protocol says about models, for both of its surfaces (HTTP in ``v2``, gRPC in ``grpc``): metadata,
configuration, statistics, the repository index, who may load. Dicts in the protocol's JSON shape."""

from __future__ import annotations

from typing import Any

from openmaas.entities.models import ModelVersion
from openmaas.errors import Forbidden, InvalidRequest
from openmaas.gateway.auth import Principal
from openmaas.gateway.service import Gateway

EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics", "model_configuration"]


def version_number(version: str | None) -> int | None:
    if version is None or version == "":
        return None
    try:
        number = int(version)
    except ValueError:
        raise InvalidRequest(f"model version must be an integer, got '{version}'", param="version") from None
    if number < 1:
        raise InvalidRequest(f"model version must be 1 or more, got {number}", param="version")
    return number


def timeout_parameter(parameters: dict[str, Any]) -> float | None:
    """Triton's ``timeout`` request parameter, in microseconds, as seconds."""
    raw = parameters.get("timeout")
    if raw is None:
        return None
    if not isinstance(raw, int | float) or isinstance(raw, bool) or raw <= 0:
        raise InvalidRequest("parameters.timeout must be a positive number of microseconds", param="timeout")
    return float(raw) / 1_000_000


def model_metadata(gw: Gateway, mv: ModelVersion) -> dict[str, Any]:
    versions = [str(v.version) for v in gw.versions(mv.model)]
    return {
        "name": mv.model,
        "versions": versions,
        "platform": gw.platform(mv),
        "inputs": [t.model_dump() for t in mv.signature.inputs],
        "outputs": [t.model_dump() for t in mv.signature.outputs],
    }


def _triton_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def model_config(gw: Gateway, mv: ModelVersion) -> dict[str, Any]:
    """A version as Triton's model configuration: dims without the batch dimension when the model batches."""
    batching = gw.batching(mv)
    batched = all(t.shape and t.shape[0] == -1 for t in [*mv.signature.inputs, *mv.signature.outputs])

    def tensors(specs: list[Any]) -> list[dict[str, Any]]:
        return [
            {"name": t.name, "data_type": _triton_type(t.datatype), "dims": list(t.shape[1:] if batched else t.shape)}
            for t in specs
        ]

    config: dict[str, Any] = {
        "name": mv.model,
        "platform": gw.platform(mv),
        "backend": mv.format,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": batching.max_batch_size if batched else 0,
        "input": tensors(mv.signature.inputs),
        "output": tensors(mv.signature.outputs),
        "instance_group": [{"name": mv.model, "kind": "KIND_CPU", "count": batching.instances}],
    }
    if batched:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": int(batching.max_queue_delay_ms * 1000),
            "preferred_batch_size": [],
        }
    return config


def require_manage(gw: Gateway, who: Principal, model: str) -> str:
    """Loading and unloading spend the platform's memory: the platform admin or the model's owner org.
    Returns the model's full name."""
    found = gw.get_model(who, model)
    if not who.is_platform_admin and found.owner_org_id != who.org_id:
        raise Forbidden("only the model's owner organisation or the platform admin may load or unload it")
    who.require("models.manage")
    return found.name


def repository_index_entries(gw: Gateway, who: Principal) -> list[dict[str, str]]:
    entries = []
    for model in gw.list_models(who):
        for mv in gw.versions(model.name):
            state: str = gw.state(mv)
            reason = "unloaded (loads on first request)" if state == "UNAVAILABLE" else ""
            prep = gw.preparing(mv) if state == "PREPARING" else None
            if prep is not None:  # Triton's vocabulary has no PREPARING: it is a long first LOADING
                state, reason = "LOADING", f"preparing: {prep.step}, {prep.progress:.0%}"
            entries.append({"name": mv.model, "version": str(mv.version), "state": state, "reason": reason})
    return entries


def stats_entries(gw: Gateway, who: Principal, model: str | None, version: int | None) -> list[dict[str, Any]]:
    """Triton's ``model_stats``: every visible model (``model`` None), one model's versions, or one version."""
    if model is None:
        versions = [mv for m in gw.list_models(who) for mv in gw.versions(m.name)]
    elif version is None:
        versions = gw.versions(gw.get_model(who, model).name)
    else:
        versions = [gw.model_version(who, model, version)]
    return [gw.inference_stats(mv).to_json(mv.model, mv.version) for mv in versions]
