"""API keys: who may use the server's port.

``mini-vllm serve --api-key KEY`` (repeatable) or the environment variable ``MINI_VLLM_API_KEY``
(one key) turn the check on. Then every HTTP route except the public ones (``/health``,
``/version``, ``/metrics`` and the browser page's static files) and every WebSocket handshake need
a key, sent one of two ways:

- the header ``Authorization: Bearer KEY`` (HTTP, and WebSocket clients that can set headers);
- for browsers, which cannot set headers on a WebSocket: the subprotocol
  ``mini-vllm.bearer.`` + base64url(UTF-8 of KEY), without padding, offered beside the plain
  subprotocol ``mini-vllm``. base64url's alphabet is made of RFC 6455 token characters, so the
  offer is valid whatever the key holds; the server answers ``mini-vllm`` (it must name one the
  client offered, and it never echoes the key).

Keys are kept only as SHA-256 digests and compared in constant time against every key, with no
early exit that would tell which one matched (or how long it is). Nothing here logs a key, and a
refusal never repeats the key it was given.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping, Sequence

import attrs

from mini_vllm.engine.errors import ConfigError
from mini_vllm.transport.http import HttpError

API_KEY_ENV = "MINI_VLLM_API_KEY"
SUBPROTOCOL = "mini-vllm"  # what the server selects when a client offers it
BEARER_SUBPROTOCOL_PREFIX = "mini-vllm.bearer."
MAX_KEY_CHARS = 4096  # a header line has to carry it
_CHALLENGE = ("WWW-Authenticate", 'Bearer realm="mini-vllm"')


def keys_from(flags: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The server's keys: the ``--api-key`` flags when given, else ``MINI_VLLM_API_KEY`` (if set and
    non-empty), else none (no check). As vLLM's ``--api-key`` / ``VLLM_API_KEY``: the flag wins."""
    if flags:
        return tuple(flags)
    value = (os.environ if environ is None else environ).get(API_KEY_ENV, "")
    return (value,) if value else ()


def client_key(api_key: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The key a client sends: ``api_key`` when given (``""``: none at all), else ``MINI_VLLM_API_KEY``."""
    if api_key is not None:
        return api_key or None
    return (os.environ if environ is None else environ).get(API_KEY_ENV) or None


def bearer_header(api_key: str) -> tuple[bytes, bytes]:
    """``(b"Authorization", b"Bearer KEY")``, as trio-websocket's ``extra_headers`` take it."""
    return b"Authorization", b"Bearer " + api_key.encode("utf-8")


def subprotocol_token(api_key: str) -> str:
    """``mini-vllm.bearer.`` + base64url(UTF-8 of ``api_key``) without padding: a valid RFC 6455
    subprotocol token whatever the key's characters (offer ``mini-vllm`` beside it)."""
    encoded = base64.urlsafe_b64encode(api_key.encode("utf-8")).rstrip(b"=").decode("ascii")
    return BEARER_SUBPROTOCOL_PREFIX + encoded


def select_subprotocol(offered: Iterable[str]) -> str | None:
    """The subprotocol the server answers: ``mini-vllm`` when offered (a browser that offered
    subprotocols fails a handshake whose answer names none), else none."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


def check_key(key: str, source: str = "--api-key") -> str:
    """``key`` if it can be an API key, else ConfigError naming ``source`` (never the key)."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{source}: an API key must be a non-empty string")
    if len(key) > MAX_KEY_CHARS:
        raise ConfigError(f"{source}: an API key must be at most {MAX_KEY_CHARS} characters, got {len(key)}")
    if key != key.strip():
        raise ConfigError(f"{source}: an API key must not start or end with whitespace (HTTP drops it)")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in key):
        raise ConfigError(f"{source}: an API key must not hold control characters (a header cannot carry them)")
    return key


def _digest(candidate: bytes) -> bytes:
    return hashlib.sha256(candidate).digest()


@attrs.frozen
class ApiKeys:
    """The keys a server accepts (none: every request is let in). Build with ``ApiKeys.of(keys)``."""

    _digests: tuple[bytes, ...] = attrs.field(default=(), repr=False)

    @classmethod
    def of(cls, keys: Sequence[str], source: str = "--api-key") -> ApiKeys:
        if isinstance(keys, str):  # one key given bare: a string is a sequence of one-letter keys
            keys = (keys,)
        return cls(tuple(_digest(check_key(k, source).encode("utf-8")) for k in keys))

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def matches(self, candidate: bytes) -> bool:
        """Whether ``candidate`` is one of the keys: every key is compared, digests of equal length."""
        digest = _digest(candidate)
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)  # no early exit: the time says nothing of which
        return found

    def http_refusal(self, headers: Sequence[tuple[bytes, bytes]]) -> HttpError | None:
        """401 unless the request carries a valid ``Authorization: Bearer KEY`` (None: let it in)."""
        if not self.enabled:
            return None
        values = [value for name, value in headers if name.lower() == b"authorization"]
        if not values:
            return _refusal(
                "this server needs an API key: send the header 'Authorization: Bearer KEY' "
                "(the key the server was started with: --api-key or MINI_VLLM_API_KEY)"
            )
        if len(values) == 1 and (candidate := _bearer(values[0])) is not None and self.matches(candidate):
            return None
        return _refusal("the API key is not valid: send 'Authorization: Bearer KEY' with a key the server accepts")

    def websocket_refusal(self, headers: Sequence[tuple[bytes, bytes]], subprotocols: Sequence[str]) -> HttpError | None:
        """401 unless the handshake carries a valid key, in the header or as a bearer subprotocol."""
        if not self.enabled:
            return None
        offered = [p for p in subprotocols if p.startswith(BEARER_SUBPROTOCOL_PREFIX)]
        has_header = any(name.lower() == b"authorization" for name, _ in headers)
        if not offered and not has_header:
            return _refusal(
                "this server needs an API key: send the header 'Authorization: Bearer KEY', or (browsers) offer "
                f"the subprotocols {SUBPROTOCOL!r} and {BEARER_SUBPROTOCOL_PREFIX!r} + base64url(KEY) without padding"
            )
        accepted = False
        if has_header:
            accepted = self.http_refusal(headers) is None
        for token in offered:  # all of them: each is compared in full
            candidate = _from_subprotocol(token)
            accepted |= candidate is not None and self.matches(candidate)
        if accepted:
            return None
        return _refusal("the API key is not valid: the server accepts none of the keys this handshake carries")


def _bearer(value: bytes) -> bytes | None:
    scheme, _, rest = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    rest = rest.strip()
    return rest or None


def _from_subprotocol(token: str) -> bytes | None:
    encoded = token[len(BEARER_SUBPROTOCOL_PREFIX):]
    if not encoded:
        return None
    try:
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None


def _refusal(message: str) -> HttpError:
    return HttpError(401, message, "authentication_error", "invalid_api_key", headers=(_CHALLENGE,))


__all__ = [
    "API_KEY_ENV",
    "BEARER_SUBPROTOCOL_PREFIX",
    "SUBPROTOCOL",
    "ApiKeys",
    "bearer_header",
    "check_key",
    "client_key",
    "keys_from",
    "select_subprotocol",
    "subprotocol_token",
]
