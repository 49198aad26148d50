"""Who may use the service, and how often: API keys and per-client rate limits, as one ASGI middleware.

Keys file (`--api-keys FILE`): one key per line, either the key itself or its digest `sha256:<64 hex digits>`
(what `printf %s KEY | sha256sum` prints), optionally followed by a label that logs and rate limits use
instead of the key; blank lines and `#` comments are skipped. Only digests are kept in memory. A request
presents its key as `Authorization: Bearer KEY` or `X-API-Key: KEY`; its sha256 is compared with every stored
digest by `hmac.compare_digest`, all of them every time, so neither the digest comparison nor the number of
comparisons depends on how much of a key is right.

Open without a key: /healthz, the web page and its static files, and the API description (/docs,
/openapi.json), none of which carries data or model output. Rate limits count the POST requests under /v1/
(the ones that run the model), per key when keys are on, else per client address.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from hierax.errors import HieraxError
from hierax.serve.limits import TokenBuckets, retry_after

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset(
    {"/healthz", "/", "/static/app.js", "/static/style.css", "/openapi.json", "/docs", "/docs/oauth2-redirect"}
)
LIMITED_PREFIX = "/v1/"
KEY_SCOPE = "hierax.key"  # the scope entry where the middleware leaves the label of the request's key
SHORT_KEY = 16
_DIGEST = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
_HOW = "send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    label: str


def key_digest(key: str) -> bytes:
    """The sha256 digest a key is stored and compared as."""
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyRing:
    """The accepted API keys, as sha256 digests with labels."""

    def __init__(self, entries: Iterable[tuple[bytes, str]]) -> None:
        self._entries = [_Entry(digest, label) for digest, label in entries]
        if not self._entries:
            raise HieraxError("the API keys file holds no key: put one key (or sha256:<hex>) per line")

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> KeyRing:
        """Plain keys, labelled key1, key2, ..."""
        return cls((key_digest(k), f"key{i}") for i, k in enumerate(keys, start=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> KeyRing:
        """Read a keys file (see the module docstring); HieraxError naming the line for a malformed one."""
        path = Path(path)
        try:
            lines = path.read_text("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise HieraxError(f"cannot read the API keys file {path}: {err}") from None
        entries, plain, short = [], 0, 0
        for number, line in enumerate(lines, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            token, *rest = text.split(None, 1)
            label = rest[0].strip() if rest else f"key{number}"
            if token.lower().startswith("sha256:"):
                match = _DIGEST.match(token)
                if not match:
                    raise HieraxError(f"{path}, line {number}: a hashed key is sha256: and 64 hex digits")
                entries.append((bytes.fromhex(match.group(1)), label))
                continue
            plain += 1
            short += len(token) < SHORT_KEY
            entries.append((key_digest(token), label))
        ring = cls(entries)
        if short:
            logger.warning(
                "%d API key(s) in %s are shorter than %d characters: use long random keys", short, path, SHORT_KEY
            )
        if plain and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("%s holds plain keys and others may read it: chmod 600 it, or store sha256: digests", path)
        return ring

    def check(self, key: str) -> str | None:
        """The label of `key`, or None when it is not one of them (constant time: see the module docstring)."""
        digest = key_digest(key)
        found = None
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry.label
        return found


def presented_key(headers: Headers) -> str | None:
    """The key a request presents: the Bearer token of Authorization, else X-API-Key; None when neither."""
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = headers.get("x-api-key", "").strip()
    return key or None


def _error(status: int, code: str, message: str, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse({"error": code, "detail": message}, status_code=status, headers=headers)


class AccessMiddleware:
    """Refuses requests without a valid key (401) and requests over the rate limit (429 with Retry-After)."""

    def __init__(self, app: ASGIApp, keys: KeyRing | None = None, buckets: TokenBuckets | None = None) -> None:
        self.app = app
        self.keys = keys
        self.buckets = buckets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        label = None
        if self.keys is not None and path not in OPEN_PATHS:
            key = presented_key(Headers(scope=scope))
            label = None if key is None else self.keys.check(key)
            if label is None:
                code, message = (
                    ("missing_api_key", f"this server needs an API key: {_HOW}")
                    if key is None
                    else ("invalid_api_key", f"the API key is not valid: check it, and {_HOW}")
                )
                await _error(401, code, message, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
            scope[KEY_SCOPE] = label
        if self.buckets is not None and scope["method"] == "POST" and path.startswith(LIMITED_PREFIX):
            client = f"key:{label}" if label is not None else f"addr:{(scope.get('client') or ('?',))[0]}"
            wait = self.buckets.take(client)
            if wait > 0:
                after = retry_after(wait)
                message = f"too many requests: the limit is {self.buckets.limit} per client; retry in {after} s"
                await _error(429, "rate_limited", message, {"Retry-After": after})(scope, receive, send)
                return
        await self.app(scope, receive, send)
