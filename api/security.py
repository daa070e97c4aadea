"""Credentials: passwords (argon2id), access tokens (JWT), API key checksums, and the bearer
principal every handler receives. Rules about accounts, sessions and tokens live in PostgreSQL
(sql/functions/20_identity.sql, 50_auth.sql); this module holds only the cryptography that
belongs to well-kept libraries."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import zxcvbn
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OctKey
from litestar.exceptions import NotAuthorizedException
from litestar.params import HeaderParameter

ACCESS_TOKEN_SECONDS = 15 * 60
JWT_ALGORITHM = "HS256"
JWT_AUDIENCE = "pgtally"
UPGRADE_AUDIENCE = "pgtally:upgrade"
UPGRADE_TOKEN_SECONDS = 3600
PASSWORD_MIN, PASSWORD_MAX = 8, 1024
API_KEY_RE = re.compile(r"^(pgt_[A-Za-z0-9_-]{64})([0-9a-f]{8})$")

# argon2id with argon2-cffi's defaults (RFC 9106 "second recommended" profile).
hasher = PasswordHasher()
DUMMY_HASH = hasher.hash("pgtally: no such user, same work")


def password_problem(password: str) -> str | None:
    """Why a new password is refused, or None: 8 to 1,024 characters (every character counts,
    none is trimmed), and not a common or easily guessed one (zxcvbn score below 2)."""
    if len(password) < PASSWORD_MIN:
        return f"a password needs at least {PASSWORD_MIN} characters"
    if len(password) > PASSWORD_MAX:
        return f"a password has at most {PASSWORD_MAX} characters"
    result = zxcvbn.zxcvbn(password[:72])   # zxcvbn's own maximum; longer passwords are judged by their start
    if result["score"] < 2:
        warning = result["feedback"].get("warning") or "it is too easy to guess"
        return f"choose another password: {warning[0].lower() + warning[1:]}".rstrip(".")
    return None


def verify_password(password_hash: str | None, password: str) -> tuple[bool, str | None]:
    """(matches, new hash when argon2 parameters changed). An unknown user is checked against a
    dummy hash so both cases cost the same time."""
    try:
        hasher.verify(password_hash or DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return False, None
    if password_hash is None:
        return False, None
    return True, hasher.hash(password) if hasher.check_needs_rehash(password_hash) else None


@dataclass(frozen=True)
class Keys:
    """HS256 keys from api.jwt_keys(): the first signs, all verify."""

    issuer: str
    keys: list[OctKey]

    @classmethod
    def from_rows(cls, issuer: str, rows: list[tuple[str, bytes]]) -> Keys:
        return cls(issuer, [OctKey.import_key(bytes(secret), {"kid": kid}) for kid, secret in rows])

    def issue(self, session: dict[str, Any]) -> dict[str, Any]:
        """An OAuth 2.0 token response (RFC 6749 section 5.1) for a session from the database."""
        key = self.keys[0]
        kid = key.kid
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": JWT_AUDIENCE, "sub": session["user_id"] or session["account_id"],
                  "acct": session["account_id"], "sid": session["session_id"], "iat": now,
                  "exp": now + ACCESS_TOKEN_SECONDS, "jti": str(uuid.uuid4())}
        token = jwt.encode({"alg": JWT_ALGORITHM, "kid": kid}, claims, key, algorithms=[JWT_ALGORITHM])
        return {"access_token": token, "token_type": "bearer", "expires_in": ACCESS_TOKEN_SECONDS,
                "refresh_token": session["refresh_token"]}

    def upgrade_token(self, account_id: str) -> str:
        """A short-lived signed token naming an account, for the ``upgrade_url`` of a 402 or of
        /v1/identify: the pricing page then knows whose purchase it is (an anonymous device
        has no other way to say). Audience ``pgtally:upgrade``, so it is never an access token."""
        key = self.keys[0]
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": UPGRADE_AUDIENCE, "sub": str(account_id), "iat": now,
                  "exp": now + UPGRADE_TOKEN_SECONDS}
        return jwt.encode({"alg": JWT_ALGORITHM, "kid": key.kid}, claims, key, algorithms=[JWT_ALGORITHM])

    def upgrade_account(self, token: str) -> uuid.UUID | None:
        """The account an upgrade token names, or None when it is not valid or has expired."""
        try:
            decoded = jwt.decode(token, KeySet(self.keys), algorithms=[JWT_ALGORITHM])
            jwt.JWTClaimsRegistry(iss={"essential": True, "value": self.issuer},
                                  aud={"essential": True, "value": UPGRADE_AUDIENCE},
                                  exp={"essential": True}).validate(decoded.claims)
            return uuid.UUID(decoded.claims["sub"])
        except (JoseError, ValueError, TypeError, KeyError):
            return None

    def session_id(self, token: str) -> uuid.UUID:
        """The session id of a valid access token: signature (HS256 only), issuer, audience and
        expiry checked (RFC 8725). NotAuthorizedException otherwise."""
        try:
            decoded = jwt.decode(token, KeySet(self.keys), algorithms=[JWT_ALGORITHM])
            jwt.JWTClaimsRegistry(iss={"essential": True, "value": self.issuer},
                                  aud={"essential": True, "value": JWT_AUDIENCE},
                                  exp={"essential": True}, sid={"essential": True}).validate(decoded.claims)
            return uuid.UUID(decoded.claims["sid"])
        except (JoseError, ValueError, TypeError, KeyError):
            raise NotAuthorizedException("the access token is not valid or has expired") from None


@dataclass(frozen=True)
class Principal:
    """Who is calling: an API key (checked by the database) or the session of an access token."""

    api_key: str | None = None
    session_id: uuid.UUID | None = None

    @property
    def params(self) -> list[Any]:
        return [self.api_key, self.session_id]


def parse_bearer(authorization: str | None, keys: Keys) -> Principal | None:
    """Principal from ``Authorization: Bearer`` (RFC 6750): an API key (pgt_..., checksum
    verified here, so a mistyped key never reaches the database) or an access token."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise NotAuthorizedException("send Authorization: Bearer <api key or access token>")
    if token.startswith("pgt_"):
        match = API_KEY_RE.match(token)
        if not match or hashlib.sha256(match.group(1).encode()).hexdigest()[:8] != match.group(2):
            raise NotAuthorizedException("the API key is mistyped: its checksum does not match")
        return Principal(api_key=token)
    return Principal(session_id=keys.session_id(token))


AuthorizationHeader = Annotated[str | None, HeaderParameter(name="Authorization", required=False)]
