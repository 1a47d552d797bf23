"""Bearer tokens: the admin token of a node, and the check in front of every route.

The node creates an admin token on its first start and writes it to a file
only root (the daemon's user) can read; the CLI on the same machine reads that
file, so a first run needs no login step. The file is created with mode 0600
from the start (``O_EXCL`` on a fresh temporary name, then an atomic rename),
so the secret is never world-readable, not even for an instant.

Every request except ``GET /health`` (the probe) must carry
``Authorization: Bearer blx_<id>_<secret>``; that includes ``/openapi.json``
and ``/docs``, which describe what an attacker could call. The check is ASGI
middleware rather than a FastAPI dependency so no route can forget it.

A *join* token (``<data dir>/join.token`` of a cluster node, also 0600) admits
new nodes and nothing else: the middleware refuses it on every other path.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import uuid
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path

import structlog
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from blixard.api.errors import error_response
from blixard.domain.errors import AlreadyExists, BlixardError, ValidationError
from blixard.domain.meta import ObjectMeta
from blixard.domain.token import (
    Token,
    TokenRole,
    TokenSpec,
    Unauthorized,
    format_token,
    hash_secret,
    split_token,
)
from blixard.store.objects import ObjectStore

log = structlog.get_logger(__name__)

#: Paths answered without a token.
OPEN_PATHS = frozenset({"/health"})
#: The only paths a token of a role other than ``admin`` may call.
ROLE_PATHS: dict[TokenRole, frozenset[str]] = {TokenRole.JOIN: frozenset({"/v1/cluster/join"})}
_ID_BYTES = 6
_CREATE_ATTEMPTS = 5


class TokenFileError(BlixardError):
    """The admin token file cannot be read or written."""

    code = "token_file"


class TokenAuthority:
    """Issues and verifies tokens stored as :class:`blixard.domain.token.Token`."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    async def create_token(self, role: TokenRole, description: str = "") -> tuple[Token, str]:
        """Store a new token; returns it and its text (the only time the secret exists)."""
        for _ in range(_CREATE_ATTEMPTS):
            token_id = secrets.token_hex(_ID_BYTES)
            secret = secrets.token_urlsafe(32)
            token = Token(
                metadata=ObjectMeta(
                    name=token_id, uid=uuid.uuid4(), generation=1, created_at=datetime.now(UTC)
                ),
                spec=TokenSpec(
                    role=role, secret_sha256=hash_secret(secret), description=description
                ),
            )
            try:
                stored = await self.objects.create(token)
            except AlreadyExists:  # a 48-bit id collided: draw again
                continue
            return stored, format_token(token_id, secret)
        raise BlixardError(f"could not draw an unused token id in {_CREATE_ATTEMPTS} attempts")

    async def verify_text(self, text: str) -> Token:
        """The stored token whose secret ``text`` carries, or Unauthorized("invalid token")."""
        token_id, secret = split_token(text.strip())
        token = await self.objects.find(Token, token_id)
        # Compare even when the id is unknown, so timing does not reveal which ids exist.
        expected = token.spec.secret_sha256 if token is not None else "0" * 64
        if not hmac.compare_digest(hash_secret(secret), expected) or token is None:
            raise Unauthorized("invalid token")
        return token

    async def verify(self, header: str | None) -> Token:
        """Check an ``Authorization`` header value: ``Bearer <token>``."""
        if header is None or not header.strip():
            raise Unauthorized("missing bearer token")
        scheme, _, text = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not text.strip():
            raise Unauthorized("missing bearer token")
        return await self.verify_text(text)

    async def ensure_admin_token(
        self, path: Path, description: str = "admin token of this node"
    ) -> str:
        """The admin token in ``path``: kept if it still verifies, else a new one written there.

        A file whose token no longer verifies (the store was reset, or the token
        revoked) is replaced, so a restarted node always leaves a working token
        for the CLI on this machine.
        """
        return await self.ensure_token(path, TokenRole.ADMIN, description)

    async def ensure_token(self, path: Path, role: TokenRole, description: str) -> str:
        """The token of ``role`` in ``path``: kept if it still verifies, else a new one there."""
        existing = _read_token_file(path, role)
        if existing is not None:
            try:
                token = await self.verify_text(existing)
            except Unauthorized:
                log.warning(
                    "token file holds an unknown token; replacing it", path=str(path), role=role
                )
            else:
                if token.spec.role is role:
                    _tighten_mode(path)
                    return existing
        token, text = await self.create_token(role, description)
        try:
            write_secret_file(path, text + "\n")
        except OSError as exc:
            with contextlib.suppress(BlixardError):
                await self.objects.delete(token)
            raise TokenFileError(
                f"cannot write the {role} token to {path}: {exc.strerror or exc}"
            ) from None
        log.info("token created", role=role, path=str(path), token_id=token.metadata.name)
        return text

    async def revoke_text(self, text: str) -> bool:
        """Delete the stored token ``text`` names; False if there is none."""
        try:
            token_id, _ = split_token(text.strip())
        except Unauthorized:
            return False
        token = await self.objects.find(Token, token_id)
        if token is None:
            return False
        await self.objects.delete(token)
        return True


def _read_token_file(path: Path, role: TokenRole = TokenRole.ADMIN) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise TokenFileError(f"cannot read the {role} token file {path}: {reason}") from None
    return text or None


def _tighten_mode(path: Path) -> None:
    """An existing token file readable by others is narrowed to 0600 (the owner only)."""
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
            log.warning("token file was readable by others; set to 0600", path=str(path))
    except OSError as exc:
        raise TokenFileError(f"cannot set the mode of {path}: {exc.strerror}") from None


def write_secret_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only, at every instant.

    The data goes to a fresh temporary file created with ``O_EXCL`` and mode
    0600 (never an existing file, never through a symlink), is fsynced, and is
    renamed over ``path``; the directory is fsynced so the rename survives a
    crash. A reader sees the old file or the complete new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only remove bits; this states the mode exactly
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class BearerAuthMiddleware:
    """Refuse every HTTP request without a valid bearer token, except OPEN_PATHS."""

    def __init__(
        self, app: ASGIApp, authority: TokenAuthority, open_paths: Collection[str] = OPEN_PATHS
    ) -> None:
        self.app = app
        self.authority = authority
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        try:
            token = await self.authority.verify(Headers(scope=scope).get("authorization"))
        except ValidationError:
            # A malformed stored token record is the server's problem, not the caller's.
            await error_response(Unauthorized("invalid token"))(scope, receive, send)
            return
        except BlixardError as exc:
            await error_response(exc)(scope, receive, send)
            return
        role = token.spec.role
        if role is not TokenRole.ADMIN and scope["path"] not in ROLE_PATHS.get(role, frozenset()):
            refused = Unauthorized(
                f"a {role} token may only call {', '.join(sorted(ROLE_PATHS.get(role, ())))}"
            )
            await error_response(refused)(scope, receive, send)
            return
        scope.setdefault("state", {})["token"] = token
        await self.app(scope, receive, send)
