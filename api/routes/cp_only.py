"""The cp-only endpoints: transactions, leases and compaction (watch is api/routes/watch.py).

    POST   /v1/txn                    {compare, success, failure} -> {succeeded, revision, responses}
    POST   /v1/leases                 {ttl, id?}                  -> {id, ttl}
    GET    /v1/leases                                             -> {leases: [{id, ttl, granted_ttl}]}
    GET    /v1/leases/{id}                                        -> {id, ttl, granted_ttl, keys}
    DELETE /v1/leases/{id}                                        -> {id, revoked: true, revision}
    POST   /v1/leases/{id}/keepalive                              -> {id, ttl, granted_ttl}
    POST   /v1/compact                {revision}                  -> {compact_revision, revision}

A txn, in JSON (values as UTF-8 text in `value`, or any bytes in `value_base64`):

    {"compare": [{"key": "acct/a", "target": "mod_revision", "op": "==", "value": 7}],
     "success": [{"op": "put", "key": "acct/a", "value": "90"},
                 {"op": "put", "key": "acct/b", "value": "110"}],
     "failure": [{"op": "get", "key": "acct/", "prefix": true}]}
    -> {"succeeded": true, "revision": 9, "responses": [{"op": "put", "revision": 9, "created": false}, ...]}

A compare's `target` is value | version | create_revision | mod_revision | lease and its
`op` one of == != < >; `prefix: true` compares every key under `key` (an absent key has
version, revisions and lease 0 and no value). Ops are get (limit, keys_only, count_only,
revision, prefix), put (value, lease, prev), delete (prefix, prev) and txn (a nested
{compare, success, failure}).

In ap mode every route here is `501 not_supported_in_mode`, naming cp. In cp mode, a
service without the CPExtras method behind a route answers `501 not_implemented`.
Bad input is a 400 with an `invalid_*` code, and nothing reaches the service.
"""
from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from aiohttp import web

from api.errors import NotImplementedYet, invalid, json_response, not_in_mode
from api.routes.common import Params, check_key, limits_of, render_kv, service_of
from api.routes.kv import bounded
from api.service import (
    Compare,
    DeleteResult,
    LeaseInfo,
    NotFound,
    PutResult,
    RangeResult,
    TxnOp,
    TxnResult,
    prefix_end,
)

WRITE_PARAMS = ("timeout_ms", "request_id")
READ_PARAMS = ("timeout_ms",)
COMPARE_TARGETS = ("value", "version", "create_revision", "mod_revision", "lease")
COMPARE_OPS = ("==", "!=", "<", ">")
OP_KINDS = ("get", "put", "delete", "txn")
# Bounds on one txn (etcd's --max-txn-ops is 128; nesting needs a bound for recursion).
MAX_TXN_OPS = 128
MAX_TXN_DEPTH = 16
# A lease's TTL, in seconds: at least 1, at most a year (etcd caps at 9e9 s, which no
# capkv user needs; a bound keeps the expiry arithmetic honest).
MAX_LEASE_TTL_SECONDS = 365 * 24 * 3600
MAX_LEASE_ID = 2**63 - 1


def _service_method(request: web.Request, name: str, feature: str):
    service = service_of(request)
    if service.mode != "cp":
        raise not_in_mode(feature, service.mode, "cp")
    method = getattr(service, name, None)
    if method is None:
        raise NotImplementedYet(f"{feature} is not implemented yet by this node's cp service")
    return method


async def read_at_most(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` bytes (a read returns what
    has arrived, so it loops until the end of the body)."""
    body = bytearray()
    while True:
        chunk = await request.content.read(64 * 1024)
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > limit:
            return None


async def read_json(request: web.Request, example: str) -> Any:
    limit = limits_of(request).max_json_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise invalid("body", f"the body is over {limit} bytes")
    raw = await read_at_most(request, limit)
    if raw is None:
        raise invalid("body", f"the body is over {limit} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise invalid("body", f"the body must be JSON, like {example}") from None


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise invalid("body", f"{what} must be a JSON object")
    return value


def _allowed(obj: dict, fields: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise invalid("body", f"unknown field {unknown[0]!r} in {what}; allowed: {', '.join(fields)}")


def _integer(obj: dict, name: str, what: str, *, minimum: int = 0, maximum: int = 2**63 - 1, default: int | None = None) -> int | None:
    if name not in obj or obj[name] is None:
        return default
    value = obj[name]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise invalid("body", f"{name} in {what} must be a whole number from {minimum} to {maximum}")
    return value


def _flag(obj: dict, name: str, what: str) -> bool:
    value = obj.get(name, False)
    if not isinstance(value, bool):
        raise invalid("body", f"{name} in {what} must be true or false")
    return value


def _key(obj: dict, what: str, request: web.Request) -> bytes:
    key = obj.get("key")
    if not isinstance(key, str):
        raise invalid("key", f"{what} needs a key (a string)")
    raw = key.encode("utf-8")
    if not raw and _flag(obj, "prefix", what):
        return raw  # prefix "" is every key
    return check_key(raw, limits_of(request).max_key_bytes)


def _value(obj: dict, what: str, request: web.Request, *, required: bool) -> bytes | None:
    if "value" in obj and "value_base64" in obj:
        raise invalid("body", f"{what}: give value or value_base64, not both")
    if "value_base64" in obj:
        if not isinstance(obj["value_base64"], str):
            raise invalid("body", f"value_base64 in {what} must be a base64 string")
        try:
            raw = base64.b64decode(obj["value_base64"], validate=True)
        except (binascii.Error, ValueError):
            raise invalid("body", f"value_base64 in {what} is not valid base64") from None
    elif "value" in obj:
        if not isinstance(obj["value"], str):
            raise invalid("body", f"value in {what} must be a string (UTF-8 text; use value_base64 for other bytes)")
        raw = obj["value"].encode("utf-8")
    elif required:
        raise invalid("body", f"{what} needs a value (or value_base64)")
    else:
        return None
    limit = limits_of(request).max_value_bytes
    if len(raw) > limit:
        raise invalid("body", f"the value in {what} is {len(raw)} bytes; values are at most {limit} bytes")
    return raw


def _range_end(obj: dict, key: bytes, what: str) -> bytes | None:
    return prefix_end(key) if _flag(obj, "prefix", what) else None


def parse_compare(obj: Any, where: str, request: web.Request) -> Compare:
    what = f"compare {where}"
    obj = _object(obj, what)
    _allowed(obj, ("key", "target", "op", "value", "value_base64", "prefix"), what)
    key = _key(obj, what, request)
    target = obj.get("target")
    if target not in COMPARE_TARGETS:
        raise invalid("body", f"target in {what} must be one of {', '.join(COMPARE_TARGETS)}")
    op = obj.get("op")
    if op not in COMPARE_OPS:
        raise invalid("body", f"op in {what} must be one of {' '.join(COMPARE_OPS)}")
    if target == "value":
        value: bytes | int = _value(obj, what, request, required=True) or b""
    else:
        if "value_base64" in obj:
            raise invalid("body", f"{what} compares {target}: give value as a number")
        value = _integer(obj, "value", what, default=None)
        if value is None:
            raise invalid("body", f"{what} needs a value (a whole number for {target})")
    return Compare(key=key, target=target, op=op, value=value, end=_range_end(obj, key, what))


def parse_op(obj: Any, where: str, request: web.Request, depth: int) -> TxnOp:
    what = f"op {where}"
    obj = _object(obj, what)
    kind = obj.get("op")
    if kind not in OP_KINDS:
        raise invalid("body", f"{what} needs \"op\": one of {', '.join(OP_KINDS)}")
    if kind == "txn":
        _allowed(obj, ("op", "compare", "success", "failure"), what)
        compare, success, failure = parse_txn_body(obj, request, depth + 1, where + ".")
        return TxnOp(op="txn", compare=tuple(compare), success=tuple(success), failure=tuple(failure))
    if kind == "get":
        _allowed(obj, ("op", "key", "prefix", "limit", "keys_only", "count_only", "revision"), what)
        key = _key(obj, what, request)
        return TxnOp(op="get", key=key, end=_range_end(obj, key, what),
                     limit=_integer(obj, "limit", what, minimum=1, maximum=limits_of(request).max_range_limit),
                     keys_only=_flag(obj, "keys_only", what), count_only=_flag(obj, "count_only", what),
                     revision=_integer(obj, "revision", what, minimum=1))  # fmt: skip
    if kind == "put":
        _allowed(obj, ("op", "key", "value", "value_base64", "lease", "prev"), what)
        key = check_key(_key(obj, what, request), limits_of(request).max_key_bytes)
        return TxnOp(op="put", key=key, value=_value(obj, what, request, required=True),
                     lease=_integer(obj, "lease", what, default=0), prev=_flag(obj, "prev", what))  # fmt: skip
    _allowed(obj, ("op", "key", "prefix", "prev"), what)
    key = _key(obj, what, request)
    return TxnOp(op="delete", key=key, end=_range_end(obj, key, what), prev=_flag(obj, "prev", what))


def parse_txn_body(body: Any, request: web.Request, depth: int = 0, where: str = "") -> tuple[list, list, list]:
    if depth > MAX_TXN_DEPTH:
        raise invalid("txn", f"txns nest at most {MAX_TXN_DEPTH} deep")
    body = _object(body, "the txn")
    if depth == 0:
        _allowed(body, ("compare", "success", "failure"), "the txn")
    lists = []
    for name in ("compare", "success", "failure"):
        value = body.get(name, [])
        if not isinstance(value, list):
            raise invalid("body", f"{name} must be a list")
        if len(value) > MAX_TXN_OPS:
            raise invalid("txn", f"{name} has {len(value)} entries; a txn has at most {MAX_TXN_OPS} per list")
        lists.append(value)
    compare = [parse_compare(c, f"{where}{i}", request) for i, c in enumerate(lists[0])]
    success = [parse_op(o, f"{where}success.{i}", request, depth) for i, o in enumerate(lists[1])]
    failure = [parse_op(o, f"{where}failure.{i}", request, depth) for i, o in enumerate(lists[2])]
    return compare, success, failure


def render_response(op: TxnOp, response: Any, txn_revision: int) -> dict:
    """One op's answer. A get reports the txn's revision: every op of a txn sees the
    store at that one revision (its own earlier writes included)."""
    if isinstance(response, TxnResult):
        return {"op": "txn", **render_txn(op, response)}
    if isinstance(response, RangeResult):
        items = [] if op.count_only else [render_kv(kv) for kv in response.items]
        return {"op": "get", "revision": txn_revision, "items": items, "more": bool(response.more), "count": response.count}
    if isinstance(response, PutResult):
        out: dict[str, Any] = {"op": "put", "revision": response.revision, "created": bool(response.created)}
        if op.prev:
            out["prev"] = render_kv(response.prev) if response.prev is not None else None
        return out
    if isinstance(response, DeleteResult):
        out = {"op": "delete", "revision": response.revision, "deleted": response.deleted}
        if op.prev:
            out["prev"] = [render_kv(kv) for kv in response.prev]
        return out
    raise TypeError(f"unexpected txn response {type(response).__name__}")


def render_txn(txn: TxnOp | None, result: TxnResult, ops: list[TxnOp] | None = None) -> dict:
    if ops is None:
        ops = list(txn.success if result.succeeded else txn.failure)
    return {"succeeded": bool(result.succeeded), "revision": result.revision,
            "responses": [render_response(op, r, result.revision) for op, r in zip(ops, result.responses)]}  # fmt: skip


async def post_txn(request: web.Request) -> web.Response:
    params = Params(request, WRITE_PARAMS)
    txn = _service_method(request, "txn", "transactions")
    request_id = params.request_id()
    timeout = params.timeout()
    body = await read_json(request, '{"compare": [...], "success": [...], "failure": [...]}')
    compare, success, failure = parse_txn_body(body, request)
    result = await bounded(txn(compare, success, failure, request_id=request_id, timeout=timeout),
                           timeout, request, write=True)  # fmt: skip
    return json_response(render_txn(None, result, success if result.succeeded else failure))


# --- leases --------------------------------------------------------------------------------------


def render_lease(info: LeaseInfo, *, keys: bool) -> dict:
    out: dict[str, Any] = {"id": info.id, "ttl": info.ttl, "granted_ttl": info.granted_ttl}
    if keys:
        out["keys"] = [_text(k) for k in info.keys]
    return out


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def lease_id_from_path(request: web.Request) -> int:
    text = request.match_info["id"]
    if not text.isdigit() or not 1 <= int(text) <= MAX_LEASE_ID:
        raise invalid("lease", f"a lease id is a positive whole number, not {text!r:.40}")
    return int(text)


async def grant_lease(request: web.Request) -> web.Response:
    params = Params(request, READ_PARAMS)
    grant = _service_method(request, "lease_grant", "leases")
    timeout = params.timeout()
    body = _object(await read_json(request, '{"ttl": 60}'), "the body")
    _allowed(body, ("ttl", "id"), "the body")
    ttl = _integer(body, "ttl", "the body", minimum=1, maximum=MAX_LEASE_TTL_SECONDS)
    if ttl is None:
        raise invalid("ttl", 'give the lease a ttl in seconds: {"ttl": 60}')
    lease_id = _integer(body, "id", "the body", minimum=1, maximum=MAX_LEASE_ID, default=0)
    info = await bounded(grant(ttl, lease_id=lease_id, timeout=timeout), timeout, request, write=True)
    return json_response({"id": info.id, "ttl": info.ttl})


async def list_leases(request: web.Request) -> web.Response:
    params = Params(request, READ_PARAMS)
    leases = _service_method(request, "leases", "leases")
    timeout = params.timeout()
    found = await bounded(leases(timeout=timeout), timeout, request, write=False)
    return json_response({"leases": [render_lease(info, keys=False) for info in found]})


async def get_lease(request: web.Request) -> web.Response:
    params = Params(request, READ_PARAMS)
    lease_info = _service_method(request, "lease_info", "leases")
    lease_id = lease_id_from_path(request)
    timeout = params.timeout()
    info = await bounded(lease_info(lease_id, keys=True, timeout=timeout), timeout, request, write=False)
    if info.ttl < 0:
        raise NotFound(f"no lease {lease_id} (it expired, was revoked, or never existed)", code="lease_not_found", id=lease_id)
    return json_response(render_lease(info, keys=True))


async def revoke_lease(request: web.Request) -> web.Response:
    params = Params(request, READ_PARAMS)
    revoke = _service_method(request, "lease_revoke", "leases")
    lease_id = lease_id_from_path(request)
    timeout = params.timeout()
    revision = await bounded(revoke(lease_id, timeout=timeout), timeout, request, write=True)
    return json_response({"id": lease_id, "revoked": True, "revision": revision})


async def keepalive_lease(request: web.Request) -> web.Response:
    params = Params(request, READ_PARAMS)
    keepalive = _service_method(request, "lease_keepalive", "leases")
    lease_id = lease_id_from_path(request)
    timeout = params.timeout()
    info = await bounded(keepalive(lease_id, timeout=timeout), timeout, request, write=True)
    return json_response(render_lease(info, keys=False))


# --- compaction ---------------------------------------------------------------------------------


async def compact(request: web.Request) -> web.Response:
    params = Params(request, READ_PARAMS)
    compact_to = _service_method(request, "compact", "compaction")
    timeout = params.timeout()
    body = _object(await read_json(request, '{"revision": 100}'), "the body")
    _allowed(body, ("revision",), "the body")
    revision = _integer(body, "revision", "the body", minimum=1)
    if revision is None:
        raise invalid("revision", 'give the revision to compact up to: {"revision": 100}')
    store_revision = await bounded(compact_to(revision, timeout=timeout), timeout, request, write=True)
    return json_response({"compact_revision": revision, "revision": store_revision})


# (method, path, handler, query parameters) - api/openapi.py documents these.
CP_ONLY_ROUTES: tuple[tuple[str, str, Any, tuple[str, ...]], ...] = (
    ("POST", "/v1/txn", post_txn, WRITE_PARAMS),
    ("GET", "/v1/leases", list_leases, READ_PARAMS),
    ("POST", "/v1/leases", grant_lease, READ_PARAMS),
    ("GET", "/v1/leases/{id}", get_lease, READ_PARAMS),
    ("DELETE", "/v1/leases/{id}", revoke_lease, READ_PARAMS),
    ("POST", "/v1/leases/{id}/keepalive", keepalive_lease, READ_PARAMS),
    ("POST", "/v1/compact", compact, READ_PARAMS),
)


def add_routes(app: web.Application) -> None:
    for method, path, handler, _ in CP_ONLY_ROUTES:
        app.router.add_route(method, path, handler)


__all__ = ["CP_ONLY_ROUTES", "add_routes", "parse_txn_body", "read_at_most", "read_json", "render_txn"]
