"""The stand-in Keystone: as little of it as a v3 password session needs.

One user, whose password is the service's token.  The tokens it issues
expire, so that a client that never authenticates again is seen failing.
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from datetime import UTC, datetime, timedelta

from aiohttp import web

from ..errors import BadRequest
from ..httpkit import json_body

TOKEN_TTL_ENV = "GASNAP_KEYSTONE_TOKEN_TTL"  # noqa: S105 - seconds an issued token is good (tests)


class IssuedTokens:
    """The tokens the stand-in Keystone issued.  Each is good for ``ttl``
    seconds on the service's monotonic clock, while the token document
    says an hour: as a token revoked, or a Keystone restarted, looks to
    a client that believes it still has time."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._until: dict[str, float] = {}

    def issue(self) -> str:
        now = time.monotonic()
        self._until = {t: u for t, u in self._until.items() if u > now}
        token = secrets.token_urlsafe(24)
        self._until[token] = now + self.ttl
        return token

    def good(self, token: str) -> bool:
        return self._until.get(token, 0.0) > time.monotonic()

    @classmethod
    def from_env(cls) -> IssuedTokens:
        return cls(float(os.environ.get(TOKEN_TTL_ENV, "3600")))


async def issue_token(request: web.Request) -> web.Response:
    """``POST /v3/auth/tokens`` for Keystone v3 password sessions: the
    stand-in has one user, whose password is the service's token; the
    token it issues expires (``IssuedTokens``)."""
    doc = await json_body(request)
    try:
        identity = doc["auth"]["identity"]
        user = identity["password"]["user"]
        project = doc["auth"]["scope"]["project"]
        given = user["password"]
    except (KeyError, TypeError) as err:
        raise BadRequest(f"not a v3 password request: {err}", code="badRequest") from err
    expected = request.app[KEYSTONE_PASSWORD]
    if not expected or not hmac.compare_digest(str(given).encode(), expected.encode()):
        return web.json_response({"error": {"code": 401, "title": "Unauthorized",
                                            "message": "The request you have made requires "
                                                       "authentication."}}, status=401)
    now = datetime.now(UTC)
    token = {"methods": ["password"], "issued_at": now.isoformat(),
             "expires_at": (now + timedelta(hours=1)).isoformat(),
             "user": {"id": str(user.get("name")), "name": user.get("name"),
                      "domain": {"id": "default", "name": "Default"}},
             "project": {"id": str(project.get("name")), "name": project.get("name"),
                         "domain": {"id": "default", "name": "Default"}},
             "catalog": []}
    return web.json_response({"token": token}, status=201,
                             headers={"X-Subject-Token": request.app[KEYSTONE_TOKENS].issue()})


# The stand-in Keystone's one password: the service's token ("" without one).
KEYSTONE_PASSWORD = web.AppKey("keystone_password", str)
# The tokens it issued, each good until it expires.
KEYSTONE_TOKENS = web.AppKey("keystone_tokens", IssuedTokens)
