"""API.md as OpenAPI 3 (`GET /v1/openapi.json`), written by hand from the contract.

A test (tests/api/test_api_openapi.py) checks that every route the app registers is
documented here with the same methods and query parameters, and that nothing here is
missing from the app, so the two cannot drift apart silently.
"""
from __future__ import annotations

from typing import Any

from api.routes import etcd_v3, kv, watch

OPENAPI_VERSION = "3.0.3"


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _path_param(name: str, description: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, "description": description}


INT = {"type": "integer", "minimum": 0}
FLAG = {"type": "boolean", "description": "present, true/1/yes/on, or false/0/no/off"}
PARAMS: dict[str, dict] = {
    "timeout_ms": _query("timeout_ms", {"type": "integer", "minimum": 1, "default": 5000},
                         "how long the request may wait, in milliseconds"),
    "request_id": _query("request_id", {"type": "string", "maxLength": 256},
                         "makes a retry of this write idempotent: reuse it when retrying after a 504"),
    "consistency": _query("consistency", {"type": "string", "enum": ["linearizable", "serializable"]},
                          "cp: serializable reads the local replica (may be stale, no quorum needed)"),
    "revision": _query("revision", {"type": "integer", "minimum": 1}, "cp: read as of this revision (410 when compacted)"),
    "raw": _query("raw", FLAG, "return the value bytes alone (application/octet-stream), metadata in X-Capkv-* headers"),
    "prefix": _query("prefix", {"type": "string"}, "every key starting with this (range, watch), or delete the range "
                                                   "(cp DELETE: prefix=true)"),
    "limit": _query("limit", {"type": "integer", "minimum": 1, "maximum": 10000}, "at most this many keys; `more` says if there are others"),
    "start_after": _query("start_after", {"type": "string"}, "cp: paging: only keys after this one"),
    "keys_only": _query("keys_only", FLAG, "cp: leave the values out"),
    "lease": _query("lease", INT, "cp: attach the key to this lease"),
    "if_mod_revision": _query("if_mod_revision", INT,
                              "cp: compare-and-swap: only if the key's mod_revision is this (0: only if absent); 412 otherwise"),
    "prev": _query("prev", FLAG, "cp: return the previous value(s) (watch: each event's previous value)"),
    "r": _query("r", {"type": "integer", "minimum": 1}, "ap: read quorum for this request (up to N)"),
    "w": _query("w", {"type": "integer", "minimum": 1}, "ap: write quorum for this request (up to N)"),
    "context": _query("context", {"type": "string"}, "ap: causal context from a previous read (or the X-Capkv-Context header)"),
    "start_revision": _query("start_revision", {"type": "integer", "minimum": 1},
                             "watch: replay history from this revision first (410 when compacted); "
                             "reconnect with the last seen mod_revision + 1 to miss nothing"),
    "progress_ms": _query("progress_ms", {"type": "integer", "minimum": 100, "maximum": 10000, "default": 10000},
                          "watch: a progress event at least this often when idle"),
}

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            "additionalProperties": True,
        }
    },
}

ERRORS = {
    "400": "invalid_* : a bad key, parameter or body; nothing was changed",
    "404": "key_not_found (ap: carries the context), or not_found",
    "405": "method_not_allowed",
    "410": "compacted",
    "412": "precondition_failed: the compare did not hold (carries the current mod_revision)",
    "413": "value_too_large: nothing was stored",
    "501": "not_supported_in_mode / not_implemented",
    "503": "unavailable: definitely not applied (no leader, no quorum, too few replicas); safe to retry",
    "504": "outcome_unknown: the write may or may not have been applied; retry only with the same request_id",
}


def _responses(ok: str, *codes: str) -> dict:
    out: dict[str, Any] = {"200": {"description": ok, "content": {"application/json": {"schema": {"type": "object"}}}}}
    for code in codes:
        out[code] = {"description": ERRORS[code], "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return out


def _op(summary: str, params: tuple[str, ...], ok: str, *codes: str, path_params: tuple[dict, ...] = (), body: dict | None = None) -> dict:
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": list(path_params) + [PARAMS[p] for p in sorted(set(params))],
        "responses": _responses(ok, *codes),
    }
    if body is not None:
        op["requestBody"] = body
    return op


KEY = _path_param("key", "the key, percent-encoded UTF-8, 1 to 4096 bytes; may contain /")
VALUE_BODY = {"required": False, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
              "description": "the value: any bytes, up to --max-value-bytes (1 MiB by default)"}  # fmt: skip
MEMBER_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {
        "type": "object", "required": ["id", "client_url", "peer_address"],
        "properties": {"id": {"type": "string"}, "client_url": {"type": "string"}, "peer_address": {"type": "string"}},
    }}},
}  # fmt: skip


def _json_body(example: dict, description: str) -> dict:
    return {"required": True, "description": description,
            "content": {"application/json": {"schema": {"type": "object"}, "example": example}}}  # fmt: skip


TXN_BODY = _json_body(
    {"compare": [{"key": "acct/a", "target": "mod_revision", "op": "==", "value": 7}],
     "success": [{"op": "put", "key": "acct/a", "value": "90"}, {"op": "put", "key": "acct/b", "value": "110"}],
     "failure": [{"op": "get", "key": "acct/", "prefix": True}]},
    "compare: [{key, target: value|version|create_revision|mod_revision|lease, op: ==|!=|<|>, value | value_base64, "
    "prefix?}]; success/failure: [ops], an op being {op: get|put|delete|txn, key, value | value_base64, prefix, lease, "
    "prev, limit, keys_only, count_only, revision} (txn: {op: txn, compare, success, failure})")
LEASE_BODY = _json_body({"ttl": 60}, "{ttl: seconds, id?: a lease id of your choosing}")
COMPACT_BODY = _json_body({"revision": 100}, "{revision}: history below it is dropped")
WATCH_RESPONSES = {"text/event-stream": {"schema": {"type": "string"}},
                   "application/x-ndjson": {"schema": {"type": "string"}}}  # fmt: skip


def _watch_op(summary: str, params: tuple[str, ...], path_params: tuple[dict, ...] = ()) -> dict:
    op = _op(summary, params, "a stream of events", "400", "410", "501", path_params=path_params)
    op["responses"]["200"] = {"description": "one JSON event a line (application/x-ndjson), or Server-Sent Events with "
                                             "Accept: text/event-stream: {type: put|delete, key, value?, create_revision, "
                                             "mod_revision, version, prev?}, {type: progress, revision}, and a final "
                                             "{type: canceled, reason} when the server ends the watch",
                              "content": WATCH_RESPONSES}  # fmt: skip
    return op


def _gateway_paths() -> dict[str, dict[str, dict]]:
    """etcd 3.4's JSON gateway (cp mode): etcd's request and response messages, not this API's."""
    out = {}
    for path in etcd_v3.gateway_paths():
        out[path] = {"post": {
            "summary": f"etcd v3 gateway: {path.split('/', 2)[2]} (etcd 3.4 wire rules: base64 bytes, int64 as strings, "
                       "default fields left out, gRPC error codes; cp mode only)",
            "parameters": [],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {"200": {"description": "etcd's response message", "content": {"application/json": {"schema": {"type": "object"}}}},
                          "default": {"description": "etcd's error: {error, message, code (gRPC)}"}},
        }}  # fmt: skip
    return out


def _paths() -> dict[str, dict[str, dict]]:
    cp_only = ("501",)
    return {
        "/healthz": {"get": _op("200 when this node can serve its mode's reads and writes; 503 with the reason", (), "healthy", "503")},
        "/metrics": {"get": _op("Prometheus text: requests, latencies, the service's gauges", (), "metrics")},
        "/version": {"get": _op('{"capkv", "mode", "etcdserver", "etcdcluster"}', (), "versions")},
        "/health": {"get": _op('etcd\'s health check: {"health": "true"}, or 503 {"health": "false"}', (), "healthy", "503")},
        "/v1/openapi.json": {"get": _op("this document", (), "OpenAPI 3")},
        "/v1/kv": {"get": _op(
            "range: every key under a prefix. cp: {revision, items, more, count}; ap: coverage read {items, partial, more}",
            kv.CP_RANGE + kv.AP_RANGE, "the keys", "400", "410", "503")},
        "/v1/kv/{key}": {
            "get": _op("read a key. cp: {key, value, create_revision, mod_revision, version, lease?, revision}; "
                       "ap: {key, context, siblings, value?}", kv.CP_GET + kv.AP_GET,
                       "the key", "400", "404", "410", "503", path_params=(KEY,)),
            "put": _op("write a key. cp: {key, revision, created, prev?}; ap: {key, context}", kv.CP_PUT + kv.AP_PUT,
                       "written", "400", "412", "413", "503", "504", path_params=(KEY,), body=VALUE_BODY),
            "delete": _op("delete a key (cp: or a prefix). cp: {deleted, revision, prev?}; ap: {key, context} (a tombstone)",
                          kv.CP_DELETE + kv.AP_DELETE, "deleted", "400", "412", "503", "504", path_params=(KEY,)),
        },
        "/v1/cluster": {"get": _op("cluster status: cp {mode, node, leader, term, commit_index, applied_index, revision, members}; "
                                   "ap {mode, node, n, r, w, members, hints_pending, anti_entropy}", (), "status")},
        "/v1/cluster/preflist/{key}": {"get": _op("ap: {key, hash, preference_list, fallbacks}", (), "where the key lives",
                                                  "400", "501", path_params=(KEY,))},
        "/v1/cluster/members": {"post": _op("add a member", (), "added", "400", "501", "503", body=MEMBER_BODY)},
        "/v1/cluster/members/{member_id}": {"delete": _op("remove a member", (), "removed", "404", "501", "503",
                                                          path_params=(_path_param("member_id", "a node id"),))},
        "/v1/txn": {"post": _op("cp: an atomic transaction: {succeeded, revision, responses} (ap: 501 not_supported_in_mode)",
                                ("timeout_ms", "request_id"), "result", "400", "503", "504", *cp_only, body=TXN_BODY)},
        "/v1/leases": {
            "get": _op("cp: list leases: {leases: [{id, ttl, granted_ttl}]}", ("timeout_ms",), "leases", *cp_only),
            "post": _op("cp: grant a lease: {id, ttl}", ("timeout_ms",), "granted", "400", "412", *cp_only, body=LEASE_BODY),
        },
        "/v1/leases/{id}": {
            "get": _op("cp: a lease: {id, ttl, granted_ttl, keys}", ("timeout_ms",), "lease", "404", *cp_only,
                       path_params=(_path_param("id", "lease id"),)),
            "delete": _op("cp: revoke a lease; its keys are deleted at one revision: {id, revoked, revision}", ("timeout_ms",),
                          "revoked", "404", *cp_only, path_params=(_path_param("id", "lease id"),)),
        },
        "/v1/leases/{id}/keepalive": {"post": _op("cp: refresh a lease: {id, ttl, granted_ttl}", ("timeout_ms",), "refreshed",
                                                  "404", *cp_only, path_params=(_path_param("id", "lease id"),))},
        "/v1/watch": {"get": _watch_op("cp: watch every key under a prefix (prefix= is required; empty: every key)",
                                       watch.WATCH_PREFIX_PARAMS)},
        "/v1/watch/{key}": {"get": _watch_op("cp: watch one key", watch.WATCH_PARAMS, path_params=(KEY,))},
        "/v1/compact": {"post": _op("cp: drop history below a revision: {compact_revision, revision}", ("timeout_ms",),
                                    "compacted", "400", "410", *cp_only, body=COMPACT_BODY)},
        **_gateway_paths(),
    }


def build_openapi(version: str) -> dict:
    """The OpenAPI 3 document of API.md as this build serves it."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "capkv HTTP API",
            "version": version,
            "description": "A distributed key-value store: cp mode (Raft, linearizable, etcd-like) or ap mode "
            "(Dynamo-style, always writable). The mode is chosen when the cluster starts; "
            "some parameters apply to one mode only (marked cp: or ap:), the others are 400 invalid_parameter there.",
        },
        "paths": _paths(),
        "components": {"schemas": {"Error": ERROR_SCHEMA}},
    }


__all__ = ["build_openapi", "OPENAPI_VERSION"]
