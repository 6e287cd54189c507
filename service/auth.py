"""Optional API keys for the routes that read or write stored user data (REMI_API_KEYS)."""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from service.errors import Unauthorized

# Declared as a security scheme in OpenAPI; checked only when API keys are configured.
api_key_header = APIKeyHeader(
    name="X-API-Key",
    scheme_name="ApiKey",
    description="Needed on the data routes when REMI_API_KEYS (or REMI_API_KEYS_FILE) is set: "
    "POST /events, and /recommend and /recommend/batch when they read a stored history.",
    auto_error=False,
)


# A 401's WWW-Authenticate: no registered HTTP scheme sends a key in a header of its own.
CHALLENGE = 'ApiKey header="X-API-Key"'


def key_digest(key: str) -> bytes:
    # Comparing fixed-size digests keeps the comparison's time free of the keys' lengths.
    return hashlib.sha256(key.encode()).digest()


class DataAccess:
    """The caller's API key, checked against the configured keys where stored data is used."""

    def __init__(self, digests: frozenset[bytes], key: str | None) -> None:
        self.digests = digests
        # A header value's surrounding blanks are not part of it (RFC 9110, 5.5): h11 strips
        # them, httptools (what remi-serve runs) keeps trailing ones.
        self.key = key.strip(" \t") if key else key

    def require(self) -> None:
        if not self.digests:
            return  # no keys configured: the data routes are open
        if not self.key:
            raise Unauthorized("missing API key: send it in the X-API-Key header", CHALLENGE)
        given = key_digest(self.key)
        # Every key is compared, each in constant time, so timing tells nothing about which.
        matches = [secrets.compare_digest(given, digest) for digest in self.digests]
        if not any(matches):
            raise Unauthorized("wrong API key (X-API-Key header)", CHALLENGE)


# async, like every dependency of the service: FastAPI runs a plain `def` one in its thread pool.
async def get_data_access(
    request: Request, key: Annotated[str | None, Security(api_key_header)]
) -> DataAccess:
    return DataAccess(request.app.state.api_key_digests, key)


async def require_data_access(access: Annotated[DataAccess, Depends(get_data_access)]) -> None:
    access.require()


AccessDep = Annotated[DataAccess, Depends(get_data_access)]
