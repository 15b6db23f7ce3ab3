"""Bearer tokens and principals.

A token is ``cc1.<payload>.<signature>``: the payload is the base64url canonical JSON of
``{sub, roles, aud, iat, exp, iss, kid}`` and the signature an Ed25519 signature over
``cc1.<payload>``. Services verify signature, expiry and audience and turn the token into a
``Principal``. The private key stays with whoever issues tokens (the data dir in the
embedded mode); services only need the public key.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cabincrew.canonical import canonical_json
from cabincrew.errors import InvalidArgument, Unauthenticated, Violation
from cabincrew.signing import Signer, verify

TOKEN_PREFIX = "cc1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}$")
_ROLE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Verified tokens remembered per verifier (each entry is one live token of one client).
_VERIFIED_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a name and its roles."""

    name: str
    roles: frozenset[str] = field(default_factory=frozenset)
    # "token", "mtls", "anonymous" or "internal".
    via: str = "token"

    @property
    def authenticated(self) -> bool:
        """False for the anonymous principal."""
        return self.via != "anonymous"

    def has_role(self, role: str) -> bool:
        """Whether the principal holds ``role`` (``admin`` holds every role)."""
        return role in self.roles or "admin" in self.roles


ANONYMOUS = Principal(name="anonymous", roles=frozenset(), via="anonymous")


def parse_duration(text: str) -> float:
    """Parse ``90s``, ``15m``, ``8h``, ``7d`` (or plain seconds) into seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise InvalidArgument(
            f"invalid duration {text!r}", [Violation("ttl", "use a number with s, m, h or d")]
        )
    value = float(match.group(1))
    return value * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def issue_token(
    signer: Signer,
    principal: str,
    roles: Iterable[str],
    *,
    ttl_seconds: float = 8 * 3600,
    audience: str = "cabincrew",
    issuer: str = "cabincrew",
    now: float | None = None,
) -> str:
    """Return a signed token for ``principal`` with ``roles``."""
    role_list = sorted({r.strip() for r in roles if r.strip()})
    violations = []
    if not _NAME.match(principal):
        violations.append(Violation("principal", "1-128 of letters, digits and ._@:+-"))
    violations.extend(
        Violation("roles", f"invalid role {r!r}") for r in role_list if not _ROLE.match(r)
    )
    if ttl_seconds <= 0:
        violations.append(Violation("ttl", "must be positive"))
    if violations:
        raise InvalidArgument("cannot issue token: " + violations[0].description, violations)
    issued = int(now if now is not None else time.time())
    payload = {
        "sub": principal,
        "roles": role_list,
        "aud": audience,
        "iss": issuer,
        "iat": issued,
        "exp": issued + int(ttl_seconds),
        "kid": signer.key_id,
    }
    body = f"{TOKEN_PREFIX}.{_b64(canonical_json(payload))}"
    return f"{body}.{_b64(signer.sign(body.encode('ascii')))}"


class TokenVerifier:
    """Verifies tokens against trusted public keys (key id -> raw Ed25519 key).

    A token that verified is remembered with its expiry (its exact text is the key, and the
    trusted keys of a verifier never change), so a client's every call does not pay for a
    signature check again; expiry is still checked on every call.
    """

    def __init__(self, trusted: Mapping[str, bytes], audience: str = "cabincrew") -> None:
        if not trusted:
            raise ValueError("a token verifier needs at least one trusted key")
        self._trusted = dict(trusted)
        self._audience = audience
        self._verified: dict[str, tuple[Principal, int]] = {}

    def verify(self, token: str, now: float | None = None) -> Principal:
        """Return the token's principal, or raise ``Unauthenticated`` (reason kept vague)."""
        current = now if now is not None else time.time()
        known = self._verified.get(token)
        if known is not None:
            if known[1] > current:
                return known[0]
            del self._verified[token]
            raise Unauthenticated("bearer token has expired")
        principal, exp = self._check(token, current)
        if len(self._verified) >= _VERIFIED_CACHE_SIZE:
            self._verified.clear()  # rare (that many live tokens): start over
        self._verified[token] = (principal, exp)
        return principal

    def _check(self, token: str, current: float) -> tuple[Principal, int]:
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise Unauthenticated("malformed bearer token")
        try:
            payload = json.loads(_unb64(parts[1]))
            signature = _unb64(parts[2])
        except (ValueError, UnicodeDecodeError):
            raise Unauthenticated("malformed bearer token") from None
        if not isinstance(payload, dict):
            raise Unauthenticated("malformed bearer token")
        key = self._trusted.get(str(payload.get("kid", "")))
        if key is None or not verify(key, f"{parts[0]}.{parts[1]}".encode("ascii"), signature):
            raise Unauthenticated("bearer token signature does not verify")
        if payload.get("aud") != self._audience:
            raise Unauthenticated("bearer token is for another audience")
        exp = payload.get("exp")
        if not isinstance(exp, int) or exp <= current:
            raise Unauthenticated("bearer token has expired")
        name, roles = payload.get("sub"), payload.get("roles")
        if not isinstance(name, str) or not _NAME.match(name):
            raise Unauthenticated("malformed bearer token")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthenticated("malformed bearer token")
        return Principal(name=name, roles=frozenset(roles), via="token"), exp


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
