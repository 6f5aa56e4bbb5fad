"""Who may see a model: visibility changes by its owner and the platform admin's review before it goes public.

Pure rules over a model and its card (no storage): ``access_changes`` and ``review_changes`` say what to store or
refuse with a message the owner can act on; ``ModelRegistry.change_access`` and ``ModelRegistry.review`` apply them.
"""

from __future__ import annotations

from typing import Any, Literal

from openmaas.entities.models import Model, ModelCard, Visibility
from openmaas.errors import InvalidRequest

Decision = Literal["approve", "reject"]


def access_changes(
    model: Model,
    card: ModelCard,
    *,
    visibility: Visibility | None,
    shared_with: list[str] | None,
    by_admin: bool,
) -> dict[str, Any]:
    """The access fields to store for a change of ``visibility`` and ``shared_with`` (organisation ids).

    An owner asking for ``public`` puts the model up for review (its card must be complete) and it stays as it is
    until approved; the platform admin's ``public`` takes effect at once."""
    changes: dict[str, Any] = {}
    if shared_with is not None:
        changes["shared_with"] = shared_with
    if visibility == "public" and not by_admin:
        if model.visibility != "public":
            missing = card.missing_for_publication()
            if missing:
                raise InvalidRequest(
                    "the model card must be complete before the model can be reviewed for publication; "
                    f"missing: {', '.join(missing)}",
                    param="visibility",
                )
            changes["review_state"] = "pending"
    elif visibility is not None:
        if visibility == "shared" and not (shared_with or model.shared_with):
            raise InvalidRequest("visibility 'shared' needs 'shared_with' (organisation names)", param="shared_with")
        changes["visibility"] = visibility
        if visibility == "public":
            changes["review_state"] = "approved"
    return changes


def review_changes(model: Model, decision: Decision, reason: str) -> dict[str, Any]:
    """The access fields to store for the platform admin's decision on a pending publication request."""
    if model.review_state != "pending":
        raise InvalidRequest(
            f"model '{model.name}' has no pending review (state: {model.review_state}); its owner asks for one by "
            "setting visibility to 'public'",
            param="name",
        )
    if decision == "approve":
        return {"visibility": "public", "review_state": "approved", "review_reason": reason or None}
    if not reason:
        raise InvalidRequest("a rejection needs a 'reason' the owner can act on", param="reason")
    return {"review_state": "rejected", "review_reason": reason}
