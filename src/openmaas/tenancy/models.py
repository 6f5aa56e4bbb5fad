"""Domain objects of tenancy."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from openmaas.tenancy.roles import Role, Scope


class Org(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    created_at: datetime


class User(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    email: str
    created_at: datetime
    platform_admin: bool = False


class Member(BaseModel):
    model_config = ConfigDict(frozen=True)

    user_id: str
    email: str
    role: Role
    created_at: datetime


class KeyLimits(BaseModel):
    """Per-key limits; unset means unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(default=None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(default=None, ge=1, description="Input tokens per minute (text models).")
    ipm: int | None = Field(default=None, ge=1, description="Items (rows, inputs) per minute (other models).")
    concurrency: int | None = Field(default=None, ge=1, description="Requests in flight at once.")

    @property
    def empty(self) -> bool:
        return self.rpm is None and self.tpm is None and self.ipm is None and self.concurrency is None


class ApiKey(BaseModel):
    """What may be shown about a key: never its secret, never its hash."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    prefix: str
    suffix: str | None = None
    kind: str
    org_id: str | None
    user_id: str | None
    role: Role
    scopes: list[Scope]
    models: list[str] | None
    limits: KeyLimits
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    rotated_from: str | None
