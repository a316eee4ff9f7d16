"""What every route shares: the app's typed state, limits, and strict request parsing.

Parsing is strict on purpose: an unknown or repeated query parameter is a 400, not
ignored, because a typo in `if_mod_revision` must not turn a compare-and-swap into a blind
write. Each bad parameter gets its own code, `invalid_<param>`, and a message that says
what is allowed:

    GET /v1/kv?prefix=a&limit=0   ->  400 {"error": {"code": "invalid_limit",
                                         "message": "limit must be an integer from 1 to 10000, not '0'"}}
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import urllib.parse
from typing import Any, Iterable

from aiohttp import web

from api.errors import invalid
from api.service import APRead, KeyValue, NodeConfig

TRUE_WORDS = ("", "1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class ApiLimits:
    """Bounds the HTTP layer enforces before a request reaches a service; each says why."""

    # API.md: keys are 1..4096 bytes of UTF-8 (they live in every index entry in memory).
    max_key_bytes: int = 4096
    # API.md: values up to 1 MiB by default (`--max-value-bytes`); a body above it is
    # refused by its Content-Length before it is read, or as soon as reading passes it.
    max_value_bytes: int = 1024 * 1024
    # JSON bodies (members, later txn) are read whole into memory.
    max_json_body_bytes: int = 1024 * 1024
    # One range response holds at most this many keys; `more` says there are others.
    max_range_limit: int = 10_000
    # timeout_ms: API.md's default, and a ceiling so no request parks a handler forever.
    default_timeout_ms: int = 5000
    max_timeout_ms: int = 120_000
    # request_id values are remembered by the cp state machine: keep them short.
    max_request_id_chars: int = 256
    # Contexts are opaque but bounded (vector clocks are pruned by size in dynamo/).
    max_context_chars: int = 64 * 1024
    # After `timeout_ms` the HTTP layer gives the service this much longer to answer
    # before it answers for it (503 for reads, 504 for writes).
    timeout_grace_seconds: float = 1.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"{field.name} must be positive, not {getattr(self, field.name)!r}")

    @classmethod
    def from_config(cls, config: NodeConfig) -> "ApiLimits":
        return cls(max_value_bytes=config.max_value_bytes)


SERVICE_KEY: web.AppKey[Any] = web.AppKey("capkv_service", object)
CONFIG_KEY: web.AppKey[NodeConfig] = web.AppKey("capkv_config", NodeConfig)
LIMITS_KEY: web.AppKey[ApiLimits] = web.AppKey("capkv_limits", ApiLimits)
VERSION_KEY: web.AppKey[str] = web.AppKey("capkv_version", str)


def service_of(request: web.Request):
    return request.app[SERVICE_KEY]


def limits_of(request: web.Request) -> ApiLimits:
    return request.app[LIMITS_KEY]


def mode_of(request: web.Request) -> str:
    return request.app[SERVICE_KEY].mode


class Params:
    """The query parameters of one request, checked against the ones its route allows."""

    def __init__(self, request: web.Request, allowed: Iterable[str]):
        self.query = query = request.query
        self._request = request
        self.limits = limits_of(request)
        # Most requests carry no query string at all: nothing to check then. This runs on
        # every request, so the checks below are skipped rather than run over nothing.
        if not query:
            return
        names = set(query)
        allowed = _allowed_set(allowed)
        if not names <= allowed:
            unknown = sorted(names - allowed)
            raise invalid(
                "parameter",
                f"unknown query parameter {unknown[0]!r} for {request.method} on this path; "
                f"allowed: {', '.join(sorted(allowed)) or 'none'}",
                parameter=unknown[0],
            )
        if len(names) != len(query):  # some name is repeated: find which, as before
            for name in allowed:
                if len(query.getall(name, [])) > 1:
                    raise invalid(name, f"{name} is given more than once; give it once")

    @property
    def raw_query(self) -> str:
        """The query string as the client sent it (only key-like parameters need it)."""
        return self._request.rel_url.raw_query_string

    def has(self, name: str) -> bool:
        return name in self.query

    def flag(self, name: str) -> bool:
        """`?name`, `?name=true|1|yes|on` -> True; absent or `false|0|no|off` -> False."""
        if name not in self.query:
            return False
        text = self.query[name].strip().lower()
        if text in TRUE_WORDS:
            return True
        if text in FALSE_WORDS:
            return False
        raise invalid(name, f"{name} is a flag: give true or false, not {self.query[name]!r:.40}")

    def integer(self, name: str, *, minimum: int, maximum: int | None = None, default: int | None = None) -> int | None:
        if name not in self.query:
            return default
        text = self.query[name].strip()
        value: int | None
        try:
            value = int(text, 10) if text.lstrip("-").isdigit() else None
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
            raise invalid(name, f"{name} must be an integer {bound}, not {self.query[name]!r:.40}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        if name not in self.query:
            return default
        value = self.query[name]
        if value not in choices:
            raise invalid(name, f"{name} must be one of {', '.join(choices)}, not {value!r:.40}")
        return value

    def string(self, name: str, *, max_chars: int, default: str | None = None) -> str | None:
        if name not in self.query:
            return default
        value = self.query[name]
        if not value or len(value) > max_chars:
            raise invalid(name, f"{name} must be 1 to {max_chars} characters")
        return value

    def key_text(self, name: str, *, allow_empty: bool) -> bytes | None:
        """A key-like parameter (prefix, start_after): the exact bytes the client
        percent-encoded (read from the raw query string, since aiohttp's decoded view
        replaces invalid UTF-8), which must be UTF-8 and at most max_key_bytes."""
        if name not in self.query:
            return None
        raw = b""
        for part in self.raw_query.split("&"):
            field, _, value = part.partition("=")
            if urllib.parse.unquote_plus(field) == name:
                raw = urllib.parse.unquote_to_bytes(value.replace("+", " "))
        if not raw and not allow_empty:
            raise invalid(name, f"{name} must not be empty")
        if len(raw) > self.limits.max_key_bytes:
            raise invalid(name, f"{name} is {len(raw)} bytes; keys are at most {self.limits.max_key_bytes} bytes")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid(name, f"{name} must be valid UTF-8 once percent-decoded") from None
        return raw

    def timeout(self) -> float:
        """`timeout_ms` in seconds (default from the limits)."""
        ms = self.integer("timeout_ms", minimum=1, maximum=self.limits.max_timeout_ms, default=self.limits.default_timeout_ms)
        return ms / 1000.0

    def request_id(self) -> str | None:
        return self.string("request_id", max_chars=self.limits.max_request_id_chars)


@functools.lru_cache(maxsize=64)
def _allowed_set_cached(allowed: tuple[str, ...]) -> frozenset[str]:
    return frozenset(allowed)


def _allowed_set(allowed: Iterable[str]) -> frozenset[str] | set[str]:
    # Routes pass module-level tuples: their sets are built once (a bounded cache), not
    # per request.
    if isinstance(allowed, tuple):
        return _allowed_set_cached(allowed)
    return set(allowed)


def key_from_path(request: web.Request, route_prefix: str) -> bytes:
    """The key in the raw request path after `route_prefix`, percent-decoded, validated.

    The raw path is used, not aiohttp's decoded one, so `%2F` and invalid UTF-8 are seen
    exactly as the client sent them: `/v1/kv/a%2Fb` is the key `a/b`; `/v1/kv/%FF` is 400.
    """
    raw_path = request.raw_path.split("?", 1)[0]
    if not raw_path.startswith(route_prefix):
        raise invalid("key", "the key must follow " + route_prefix)
    encoded = raw_path[len(route_prefix):]
    key = urllib.parse.unquote_to_bytes(encoded)
    return check_key(key, limits_of(request).max_key_bytes)


def check_key(key: bytes, max_key_bytes: int) -> bytes:
    if not key:
        raise invalid("key", "the key is empty: put it after /v1/kv/, e.g. /v1/kv/config/app")
    if len(key) > max_key_bytes:
        raise invalid("key", f"the key is {len(key)} bytes; keys are 1 to {max_key_bytes} bytes of UTF-8", size=len(key))
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("key", "the key is not valid UTF-8 once percent-decoded; percent-encode UTF-8 text") from None
    return key


# --- rendering --------------------------------------------------------------------------------


def bytes_field(name: str, raw: bytes) -> dict[str, str]:
    """`{name: text}` when `raw` is UTF-8, else `{name_base64: ...}` (API.md's value rule)."""
    try:
        return {name: raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{name}_base64": base64.b64encode(raw).decode("ascii")}


def render_kv(kv: KeyValue) -> dict[str, Any]:
    out: dict[str, Any] = bytes_field("key", kv.key)
    if kv.value is not None:
        out.update(bytes_field("value", kv.value))
    out.update(create_revision=kv.create_revision, mod_revision=kv.mod_revision, version=kv.version)
    if kv.lease:
        out["lease"] = kv.lease
    return out


def render_ap_read(read: APRead) -> dict[str, Any]:
    out: dict[str, Any] = bytes_field("key", read.key)
    out["context"] = read.context
    out["siblings"] = [bytes_field("value", s) for s in read.siblings]
    if len(read.siblings) == 1:
        out.update(bytes_field("value", read.siblings[0]))
    return out


__all__ = [
    "ApiLimits",
    "CONFIG_KEY",
    "LIMITS_KEY",
    "Params",
    "SERVICE_KEY",
    "VERSION_KEY",
    "bytes_field",
    "check_key",
    "key_from_path",
    "limits_of",
    "mode_of",
    "render_ap_read",
    "render_kv",
    "service_of",
]
