"""Who may call the control surface: bearer tokens with scopes (both doors).

A client sends ``Authorization: Bearer <token>``: an HTTP header on ``/v1/``, the same
header on a NATS request. :class:`Guard` turns that header into a :class:`Principal`
(the token's name, its scopes and how many symbols its leases may hold) or refuses it:

- no header, or a token that is not configured: ``401`` (with ``WWW-Authenticate:
  Bearer``), unless the door admits anonymous clients, who are the principal
  ``anonymous`` with the door's anonymous scopes;
- a token (or an anonymous client) without the scope the endpoint needs: ``403``.

A wrong token is always a ``401``, even where anonymous clients are admitted: a client
that sent a token meant to be someone and must learn that it is not.

Tokens are compared in constant time: every configured token's SHA-256 digest is
compared with the presented one's (``hmac.compare_digest``), all of them, whatever
matches, so the time taken says nothing about which token or how much of it matched.
A token is a secret: it is never logged, never part of an error, a metric or a
``repr``; only its name is.

Anonymous scopes per door (``control.auth.anonymous``): when set, exactly those; when
unset, every scope on a loopback door without tokens (a single-user bridge on a
laptop behaves as before) and nothing anywhere else. ``aleno-bridge validate`` refuses
a non-loopback door without tokens and without an explicit ``anonymous``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from pydantic import SecretStr

from bridge.config.schema import ANONYMOUS, SCOPES, AuthConfig

#: the ``WWW-Authenticate`` challenge of a 401
CHALLENGE: Final = 'Bearer realm="aleno-bridge"'
#: the longest ``Authorization`` header looked at (a token is at most 4096 characters)
MAX_HEADER_LEN: Final = 4200


@dataclass(frozen=True, slots=True)
class Token:
    """A configured token, resolved (``token_file`` read)."""

    name: str
    token: SecretStr
    scopes: frozenset[str]
    #: ``None``: ``control.auth.default_max_symbols``
    max_symbols: int | None = None

    def __repr__(self) -> str:
        return f"Token(name={self.name!r}, scopes={sorted(self.scopes)!r})"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is: a token's name, or ``anonymous``."""

    name: str
    scopes: frozenset[str]
    #: the symbols its live leases may hold at once
    max_symbols: int
    anonymous: bool = False


class AuthError(Exception):
    """A refused request: ``status`` 401 (who are you?) or 403 (not allowed)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def anonymous_scopes(auth: AuthConfig, tokens: Sequence[Token], loopback: bool
                     ) -> frozenset[str]:
    """The scopes of a request without a token on a door (see the module)."""
    if auth.anonymous is not None:
        return frozenset(auth.anonymous)
    if not tokens and loopback:
        return frozenset(SCOPES)
    return frozenset()


class Guard:
    """The tokens and anonymous scopes of one door; :meth:`check` decides."""

    def __init__(self, tokens: Iterable[Token], anonymous: frozenset[str],
                 default_max_symbols: int) -> None:
        self._tokens = tuple(tokens)
        self._digests = tuple(_digest(t.token.get_secret_value()) for t in self._tokens)
        self.anonymous = anonymous
        self._anonymous = Principal(ANONYMOUS, anonymous, default_max_symbols, anonymous=True)
        self._principals = tuple(
            Principal(t.name, t.scopes, t.max_symbols or default_max_symbols)
            for t in self._tokens)

    def __repr__(self) -> str:
        return (f"Guard(tokens={[t.name for t in self._tokens]!r}, "
                f"anonymous={sorted(self.anonymous)!r})")

    @property
    def names(self) -> list[str]:
        """The configured tokens' names (never the tokens)."""
        return [p.name for p in self._principals]

    @property
    def open(self) -> bool:
        """Whether a request without a token may do anything at all."""
        return bool(self.anonymous)

    def identify(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header value (``None``: absent).
        Raises :class:`AuthError` (401)."""
        if authorization is None or not authorization.strip():
            if self.anonymous:
                return self._anonymous
            msg = ("a token is required: send the header 'Authorization: Bearer <token>' "
                   "(control.auth.tokens)")
            raise AuthError(msg, 401)
        if len(authorization) > MAX_HEADER_LEN:
            raise AuthError("the Authorization header is too long", 401)
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            msg = "the Authorization header must be 'Bearer <token>'"
            raise AuthError(msg, 401)
        presented = _digest(value.strip())
        found: Principal | None = None
        # every digest is compared, whatever matched: the time says nothing
        for digest, principal in zip(self._digests, self._principals, strict=True):
            if hmac.compare_digest(digest, presented) and found is None:
                found = principal
        if found is None:
            raise AuthError("the token is not valid here", 401)
        return found

    def check(self, authorization: str | None, scope: str) -> Principal:
        """The principal, allowed ``scope``; raises :class:`AuthError` (401 or 403)."""
        principal = self.identify(authorization)
        if scope not in principal.scopes:
            who = "anonymous clients" if principal.anonymous else f"token {principal.name!r}"
            have = ", ".join(sorted(principal.scopes)) or "none"
            if principal.anonymous:
                msg = (f"{who} may not {_VERB[scope]} (their scopes: {have}); send "
                       "'Authorization: Bearer <token>' with a token that has the "
                       f"{scope!r} scope")
                raise AuthError(msg, 401)
            msg = (f"{who} may not {_VERB[scope]}: it lacks the {scope!r} scope "
                   f"(its scopes: {have})")
            raise AuthError(msg, 403)
        return principal


_VERB: Final = {"snapshot": "read snapshots", "lease": "lease symbols"}


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


__all__ = [
    "CHALLENGE",
    "AuthError",
    "Guard",
    "Principal",
    "Token",
    "anonymous_scopes",
]
