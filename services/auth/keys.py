"""API keys in the job database: created, listed and revoked by operators, looked up by the services.

A key is shown once, when it is made; the database keeps its SHA-256 and its first characters.
Each key belongs to a tenant (a project): the services scope every job to the tenant of the
key that submitted it. An admin key sees and acts on every tenant's jobs.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from services.config import TENANT_PATTERN
from services.db.models import ApiKey
from services.db.types import utcnow
from services.errors import InvalidRequest

# Generated keys start with this, so secret scanners and people can recognise them.
KEY_PREFIX = "must_"
# Characters of a key kept in clear for listings (the prefix and a few random ones).
SHOWN_CHARS = 12
_TENANT_RE = re.compile(TENANT_PATTERN)


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: a tenant, and whether the key may act on every tenant's jobs."""

    tenant: str
    admin: bool = False
    key_id: str | None = None

    @property
    def scope(self) -> str | None:
        """The tenant to restrict job lookups to; None for an admin (every tenant)."""
        return None if self.admin else self.tenant


def hash_key(key: str) -> str:
    """The stored form of a key: its SHA-256 as 64 hex digits."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    """The tenant name, or InvalidRequest saying what a tenant name may hold."""
    if not _TENANT_RE.match(tenant):
        raise InvalidRequest(
            f"tenant {tenant!r} is not a valid name: a-z, 0-9, '_', '.' and '-', starting with a "
            "letter or digit, at most 64 characters"
        )
    return tenant


def create_key(
    session: Session, *, tenant: str, name: str | None = None, admin: bool = False
) -> tuple[ApiKey, str]:
    """Store a new random key for `tenant`; return its row and the key itself (shown only now)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        tenant=check_tenant(tenant), name=name, key_hash=hash_key(key), prefix=key[:SHOWN_CHARS], admin=admin
    )
    session.add(row)
    session.commit()
    return row, key


def list_keys(session: Session, *, tenant: str | None = None, include_revoked: bool = False) -> list[ApiKey]:
    """The stored keys (of one tenant, or all), oldest first."""
    stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant is not None:
        stmt = stmt.where(ApiKey.tenant == tenant)
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(stmt))


def revoke_key(session: Session, key_id: str) -> bool:
    """Revoke the key with this id; False if no live key has it."""
    stmt = update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    result: Any = session.execute(stmt.execution_options(synchronize_session=False))
    session.commit()
    return bool(result.rowcount)


def find_principal(session: Session, key: str) -> Principal | None:
    """The principal of a live stored key, or None."""
    stmt = select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    row = session.scalars(stmt).one_or_none()
    return None if row is None else Principal(tenant=row.tenant, admin=row.admin, key_id=row.id)
