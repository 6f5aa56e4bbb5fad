"""Roles, scopes and what each allows: one table, checked in one place (``Principal.require``)."""

from __future__ import annotations

from typing import Literal, get_args

Role = Literal["viewer", "member", "admin", "owner"]
Scope = Literal["inference", "manage", "billing"]
Action = Literal[
    "org.read",
    "models.read",
    "usage.read",
    "audit.read",
    "inference",
    "models.manage",
    "keys.manage",
    "members.manage",
    "billing",
]

ROLES: tuple[Role, ...] = get_args(Role)
ALL_SCOPES: tuple[Scope, ...] = get_args(Scope)
_RANK = {role: i for i, role in enumerate(ROLES)}

# action -> (least role that may do it, scope an API key needs for it; None = any key of the org)
RULES: dict[Action, tuple[Role, Scope | None]] = {
    "org.read": ("viewer", None),
    "models.read": ("viewer", None),
    "usage.read": ("viewer", "billing"),
    "audit.read": ("admin", "manage"),
    "inference": ("member", "inference"),
    "models.manage": ("member", "manage"),
    "keys.manage": ("member", "manage"),
    "members.manage": ("admin", "manage"),
    "billing": ("admin", "billing"),
}


def at_least(role: Role, least: Role) -> bool:
    return _RANK[role] >= _RANK[least]


def why_not(role: Role, scopes: frozenset[str], action: Action) -> str | None:
    """None when ``role`` with ``scopes`` may do ``action``, else the reason in words."""
    least, scope = RULES[action]
    if not at_least(role, least):
        return f"this needs the '{least}' role or higher in the organisation (you are '{role}')"
    if scope is not None and scope not in scopes:
        return f"this API key lacks the '{scope}' scope"
    return None
