"""Who may call the API and how often: optional Bearer API keys, and slowapi rate limits per key
(or per client address when keys are off), stored in memory or in redis for several replicas."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from slowapi import Limiter
from slowapi.util import get_remote_address

from config.settings import Settings

bearer = HTTPBearer(auto_error=False, description="one of the server's API keys, when it has any")


def key_guard(settings: Settings) -> Callable:
    """A FastAPI dependency: 401 unless the request carries one of the keys (none configured: open)."""
    keys = settings.keys()
    challenge = {"WWW-Authenticate": "Bearer"}

    async def guard(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not keys:
            return
        if credentials is None:
            raise HTTPException(401, "missing API key: send the header Authorization: Bearer <key>", challenge)
        given = credentials.credentials.encode()
        if not any([hmac.compare_digest(given, key) for key in keys]):  # a list: every key is compared
            raise HTTPException(401, "invalid API key", challenge)

    return guard


def make_limiter(settings: Settings) -> Limiter | None:
    """None unless RATE_LIMIT is set. The key is the API key the request matched, hashed (never the key
    itself), or the client's address when the server has no keys (so that clients cannot mint new keys
    to escape). The matched key, not the header: "Bearer  k1" (two spaces) is k1, and one bucket."""
    if not settings.rate_limit:
        return None
    keys = {key: "key:" + hashlib.sha256(key).hexdigest()[:32] for key in settings.keys()}

    def client(request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() == "bearer":
            for key, bucket in keys.items():
                if hmac.compare_digest(given, key):
                    return bucket
        return "addr:" + get_remote_address(request)

    return Limiter(key_func=client, storage_uri=settings.rate_limit_storage, headers_enabled=True,
                   key_prefix="medusa")
