"""API tokens: who may call the API, stored without their secret.

A token's text is ``blx_<id>_<secret>``. The store keeps only the SHA-256 of
the secret under ``/blixard/v1/tokens/<id>``, so reading the store (or a
backup of it) never yields a usable credential. A plain hash is enough here,
unlike for passwords: the secret is 256 random bits, so there is nothing to
guess and no need for a slow key-derivation function.

Tokens are not registered in :mod:`blixard.domain.objects` on purpose: that
registry is what ``apply -f`` documents resolve through, and a token must
never be creatable by writing its hash into a document.
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from blixard.domain.errors import BlixardError, ValidationError
from blixard.domain.fields import bridge
from blixard.domain.keys import Kind
from blixard.domain.meta import SpecModel, StatusModel, StoredObject
from blixard.domain.names import is_dns_label

#: Every token's text starts with this, so secret scanners and humans recognise it.
TOKEN_PREFIX = "blx_"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{16,256}")
MAX_DESCRIPTION = 256


class Unauthorized(BlixardError):
    """No credential, or one the API does not accept."""

    code = "unauthorized"


class TokenRole(StrEnum):
    """What a token may do (until RBAC arrives).

    ``admin`` may call every route; ``join`` may only join a node to the
    cluster (``POST /v1/cluster/join``), so it can be handed to new hosts.
    """

    ADMIN = "admin"
    JOIN = "join"


def validate_sha256_hex(value: Any, field: str) -> str:
    """A SHA-256 digest as 64 lowercase hex digits."""
    if not isinstance(value, str) or _SHA256_HEX.fullmatch(value) is None:
        raise ValidationError(field, "must be a SHA-256 digest (64 lowercase hex digits)")
    return value


Sha256Hex = Annotated[str, BeforeValidator(bridge(validate_sha256_hex))]


class TokenSpec(SpecModel):
    """The role a token grants and the hash of its secret (never the secret)."""

    role: TokenRole = TokenRole.ADMIN
    secret_sha256: Sha256Hex
    description: str = Field(default="", max_length=MAX_DESCRIPTION)


class TokenStatus(StatusModel):
    """Nothing observed yet; kept for the spec/status shape every kind shares."""


class Token(StoredObject):
    """Stored under ``/blixard/v1/tokens/<id>``; ``metadata.created_at`` says when."""

    STORE_KIND = Kind.TOKENS

    kind: Literal["Token"] = "Token"
    spec: TokenSpec
    status: TokenStatus = Field(default_factory=TokenStatus)


def hash_secret(secret: str) -> str:
    """The hex SHA-256 of a token secret, as stored in ``spec.secret_sha256``."""
    return hashlib.sha256(secret.encode()).hexdigest()


def format_token(token_id: str, secret: str) -> str:
    """The text a client sends: ``blx_<id>_<secret>``."""
    return f"{TOKEN_PREFIX}{token_id}_{secret}"


def split_token(text: str) -> tuple[str, str]:
    """``(id, secret)`` of a token's text, or Unauthorized("invalid token").

    The id is a DNS label (no ``_``), so the first ``_`` after the prefix ends
    it; the secret (URL-safe base64) may itself contain ``_``.
    """
    if not text.startswith(TOKEN_PREFIX):
        raise Unauthorized("invalid token")
    token_id, sep, secret = text[len(TOKEN_PREFIX) :].partition("_")
    if not sep or not is_dns_label(token_id) or _SECRET.fullmatch(secret) is None:
        raise Unauthorized("invalid token")
    return token_id, secret
