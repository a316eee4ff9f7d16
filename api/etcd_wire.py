"""etcd 3.4's JSON gateway wire rules, as pure functions: request parsing and response
rendering for `api/routes/etcd_v3.py`. Nothing here awaits or touches the service.

The rules, all visible in ../shared/etcd-v3-captures/ (real etcd 3.4.23 answers):

- bytes (keys, values, range ends) are standard base64; int64 fields are JSON strings on
  the way out and numbers or strings on the way in; enums are names or their numbers;
- fields with their default value (0, false, "", empty list) are left out of responses:
  a delete of a missing key answers without `deleted`, a failed txn without `succeeded`;
- errors are `{"error": s, "message": s, "code": <gRPC code>}` with the HTTP status the
  gRPC gateway gives that code, and etcd's own strings;
- every response carries `header: {cluster_id, member_id, revision, raft_term}`.

    >>> render_kv(KeyValue(b"foo", b"bar", 2, 3, 2))
    {'key': 'Zm9v', 'create_revision': '2', 'mod_revision': '3', 'version': '2', 'value': 'YmFy'}
    >>> parse_int({"limit": "2"}, "limit")
    2
    >>> parse_enum({"sort_order": "DESCEND"}, "sort_order", SORT_ORDERS)
    2
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import re
from typing import Any, Iterable

from api.service import (
    Compacted,
    Compare,
    DeleteResult,
    InvalidRequest,
    KeyValue,
    NotFound,
    NotSupportedInMode,
    OutcomeUnknown,
    PreconditionFailed,
    PutResult,
    RangeResult,
    ServiceError,
    TxnOp,
    TxnResult,
    Unavailable,
    ValueTooLarge,
    WatchEvent,
)

# etcd's --max-txn-ops default: more compares or ops in one list is refused.
MAX_TXN_OPS = 128
# Nested txns deeper than this are refused (etcd bounds it by the request size only;
# the recursion here needs a bound).
MAX_TXN_DEPTH = 16

# gRPC code -> HTTP status, as etcd 3.4's grpc-gateway answers (FailedPrecondition is
# 412 there, see 072-lease-grant-duplicate-id.txt).
GRPC_HTTP_STATUS = {
    0: 200, 1: 408, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 412,
    10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401,
}  # fmt: skip
INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE = 3, 5, 9, 11
UNKNOWN, UNIMPLEMENTED, UNAVAILABLE, RESOURCE_EXHAUSTED = 2, 12, 14, 8

# etcd's error strings (etcdserver/api/v3rpc/rpctypes/error.go).
ERR_KEY_NOT_PROVIDED = "etcdserver: key is not provided"
ERR_KEY_NOT_FOUND = "etcdserver: key not found"
ERR_VALUE_PROVIDED = "etcdserver: value is provided"
ERR_LEASE_PROVIDED = "etcdserver: lease is provided"
ERR_TOO_MANY_OPS = "etcdserver: too many operations in txn request"
ERR_DUPLICATE_KEY = "etcdserver: duplicate key given in txn request"
ERR_COMPACTED = "etcdserver: mvcc: required revision has been compacted"
ERR_FUTURE_REV = "etcdserver: mvcc: required revision is a future revision"
ERR_LEASE_NOT_FOUND = "etcdserver: requested lease not found"
ERR_LEASE_EXIST = "etcdserver: lease already exists"
ERR_LEASE_TTL_TOO_LARGE = "etcdserver: too large lease TTL"
ERR_REQUEST_TOO_LARGE = "etcdserver: request is too large"
ERR_NO_LEADER = "etcdserver: no leader"
ERR_TIMEOUT = "etcdserver: request timed out"
ERR_DEADLINE = "context deadline exceeded"
ERR_MEMBER_NOT_FOUND = "etcdserver: member not found"
ERR_MEMBER_EXIST = "etcdserver: member ID already exist"

SORT_ORDERS = {"NONE": 0, "ASCEND": 1, "DESCEND": 2}
SORT_TARGETS = {"KEY": 0, "VERSION": 1, "CREATE": 2, "MOD": 3, "VALUE": 4}
COMPARE_RESULTS = {"EQUAL": 0, "GREATER": 1, "LESS": 2, "NOT_EQUAL": 3}
COMPARE_TARGETS = {"VERSION": 0, "CREATE": 1, "MOD": 2, "VALUE": 3, "LEASE": 4}
WATCH_FILTERS = {"NOPUT": 0, "NODELETE": 1}
# compare target number -> (the service's target, the request field holding the value)
_COMPARE_TARGET = {0: ("version", "version"), 1: ("create_revision", "create_revision"),
                   2: ("mod_revision", "mod_revision"), 3: ("value", "value"), 4: ("lease", "lease")}  # fmt: skip
_COMPARE_OP = {0: "==", 1: ">", 2: "<", 3: "!="}
_SORT_FIELD = {0: lambda kv: kv.key, 1: lambda kv: kv.version, 2: lambda kv: kv.create_revision,
               3: lambda kv: kv.mod_revision, 4: lambda kv: kv.value or b""}  # fmt: skip
INT64_MAX = 2**63 - 1


class EtcdError(Exception):
    """An answer in etcd's error shape: `{"error", "message", "code"}` with `status`.

        >>> EtcdError(3, ERR_KEY_NOT_PROVIDED).status
        400
    """

    def __init__(self, code: int, message: str, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else GRPC_HTTP_STATUS.get(code, 500)

    def body(self) -> dict:
        return {"error": self.message, "message": self.message, "code": self.code}


def from_service_error(exc: ServiceError, *, op: str = "") -> EtcdError:
    """The etcd error a client of the gateway expects for a capkv service error.

    `op` names the request kind where one service error means different etcd errors
    ("lease_grant": a PreconditionFailed is an existing lease id).
    """
    code = getattr(exc, "code", "")
    if code == "responses_unavailable":  # applied by an earlier attempt; etcd has no such error
        return EtcdError(UNKNOWN, exc.message)
    if isinstance(exc, Compacted):
        return EtcdError(OUT_OF_RANGE, ERR_COMPACTED)
    if isinstance(exc, NotFound) and code == "lease_not_found":
        return EtcdError(NOT_FOUND, ERR_LEASE_NOT_FOUND)
    if isinstance(exc, NotFound) and code == "member_not_found":
        return EtcdError(NOT_FOUND, ERR_MEMBER_NOT_FOUND)
    if code in ("lease_exists", "lease_already_exists") or (op == "lease_grant" and isinstance(exc, PreconditionFailed)):
        return EtcdError(FAILED_PRECONDITION, ERR_LEASE_EXIST)
    if isinstance(exc, InvalidRequest):
        if code == "invalid_revision" and "future" in exc.message:
            return EtcdError(OUT_OF_RANGE, ERR_FUTURE_REV)
        if code == "invalid_txn" and "duplicate" in exc.message.lower():
            return EtcdError(INVALID_ARGUMENT, ERR_DUPLICATE_KEY)
        if code == "invalid_txn" and "ops" in exc.message.lower():
            return EtcdError(INVALID_ARGUMENT, ERR_TOO_MANY_OPS)
        if code == "invalid_member_id" and "exist" in exc.message:
            return EtcdError(FAILED_PRECONDITION, ERR_MEMBER_EXIST)
        return EtcdError(INVALID_ARGUMENT, "etcdserver: " + exc.message)
    if isinstance(exc, ValueTooLarge):
        return EtcdError(INVALID_ARGUMENT, ERR_REQUEST_TOO_LARGE)
    if isinstance(exc, Unavailable):
        return EtcdError(UNAVAILABLE, ERR_NO_LEADER if "leader" in exc.message else ERR_TIMEOUT)
    if isinstance(exc, OutcomeUnknown):
        return EtcdError(UNKNOWN, ERR_DEADLINE)  # what etcd answers when a write's outcome is unknown
    if isinstance(exc, NotSupportedInMode):
        return EtcdError(UNIMPLEMENTED, exc.message)
    if isinstance(exc, PreconditionFailed):
        return EtcdError(FAILED_PRECONDITION, "etcdserver: " + exc.message)
    if exc.status == 501:
        return EtcdError(UNIMPLEMENTED, "etcdserver: " + exc.message)
    if exc.status == 404:
        return EtcdError(NOT_FOUND, "etcdserver: " + exc.message)
    return EtcdError(UNKNOWN, exc.message)


# --- request parsing ---------------------------------------------------------------------


def parse_json_documents(raw: bytes, *, max_documents: int) -> list[dict]:
    """One or more JSON objects, concatenated (etcd's streaming bodies: keepalive and
    watch accept `{"ID":1}{"ID":1}`). An empty body is one empty object.

        >>> parse_json_documents(b'{"ID":1}{"ID":2}', max_documents=8)
        [{'ID': 1}, {'ID': 2}]
    """
    text = _text(raw)
    decoder = json.JSONDecoder()
    documents: list[dict] = []
    position = _skip_space(text, 0)
    if position == len(text):
        return [{}]
    while position < len(text):
        if len(documents) >= max_documents:
            raise EtcdError(INVALID_ARGUMENT, f"etcdserver: more than {max_documents} requests in one body")
        try:
            document, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise EtcdError(INVALID_ARGUMENT, go_json_error(exc)) from None
        if not isinstance(document, dict):
            raise EtcdError(INVALID_ARGUMENT, f"json: cannot unmarshal {_go_type(document)} into Go value of type etcdserverpb request")
        documents.append(document)
        position = _skip_space(text, position)
    return documents


def parse_json_object(raw: bytes) -> dict:
    """Exactly one JSON object (or nothing: an empty request)."""
    documents = parse_json_documents(raw, max_documents=1)
    return documents[0]


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EtcdError(INVALID_ARGUMENT, f"invalid character in request body at offset {exc.start}") from None


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def go_json_error(exc: json.JSONDecodeError) -> str:
    """Go's encoding/json wording for a syntax error, which etcd clients see.

        >>> go_json_error(json.JSONDecodeError("Expecting property name enclosed in double quotes", "{bad", 1))
        "invalid character 'b' looking for beginning of object key string"
    """
    if exc.pos >= len(exc.doc):
        return "unexpected EOF"
    char = exc.doc[exc.pos]
    if exc.msg.startswith("Expecting property name"):
        return f"invalid character {char!r} looking for beginning of object key string"
    if exc.msg.startswith("Expecting value"):
        return f"invalid character {char!r} looking for beginning of value"
    if exc.msg.startswith("Expecting ':'"):
        return f"invalid character {char!r} after object key"
    if exc.msg.startswith("Expecting ',' delimiter"):
        return f"invalid character {char!r} after object key:value pair"
    return f"invalid character {char!r} {exc.msg.lower()}"


def _go_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if value is None:
        return "null"
    return "object"


_B64_ALPHABET = re.compile(r"[^A-Za-z0-9+/=\r\n]")


def parse_bytes(obj: dict, name: str) -> bytes:
    """A `bytes` field: standard base64 (absent or null: b"")."""
    value = obj.get(name)
    if value is None:
        return b""
    if not isinstance(value, str):
        raise EtcdError(INVALID_ARGUMENT, f"json: cannot unmarshal {_go_type(value)} into Go value of type []uint8")
    bad = _B64_ALPHABET.search(value)
    if bad is not None:
        raise EtcdError(INVALID_ARGUMENT, f"illegal base64 data at input byte {bad.start()}")
    compact = value.replace("\r", "").replace("\n", "")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise EtcdError(INVALID_ARGUMENT, f"illegal base64 data at input byte {_padding_error_at(compact)}") from None


def _padding_error_at(text: str) -> int:
    if "=" in text.rstrip("="):
        return text.index("=")
    return len(text) - len(text) % 4 if len(text) % 4 else max(0, len(text) - 1)


def parse_int(obj: dict, name: str, *, minimum: int = -(2**63), maximum: int = INT64_MAX) -> int:
    """An int64 field: a JSON number or a decimal string (absent or null: 0)."""
    value = obj.get(name)
    if value is None:
        return 0
    if isinstance(value, bool):
        raise EtcdError(INVALID_ARGUMENT, f"json: cannot unmarshal bool into Go value of type int64 ({name})")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"-?[0-9]+", text):
            raise EtcdError(INVALID_ARGUMENT, f"strconv.ParseInt: parsing {value!r}: invalid syntax")
        value = int(text)
    if not isinstance(value, int):
        raise EtcdError(INVALID_ARGUMENT, f"json: cannot unmarshal {_go_type(value)} into Go value of type int64 ({name})")
    if not minimum <= value <= maximum:
        raise EtcdError(INVALID_ARGUMENT, f"strconv.ParseInt: parsing {str(value)!r}: value out of range")
    return value


def parse_bool(obj: dict, name: str) -> bool:
    value = obj.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise EtcdError(INVALID_ARGUMENT, f"json: cannot unmarshal {_go_type(value)} into Go value of type bool ({name})")
    return value


def parse_enum(obj: dict, name: str, names: dict[str, int]) -> int:
    """An enum field: its name or its number (absent: 0)."""
    value = obj.get(name)
    if value is None:
        return 0
    if isinstance(value, str):
        if value in names:
            return names[value]
        if re.fullmatch(r"[0-9]+", value) and int(value) in names.values():
            return int(value)
        raise EtcdError(INVALID_ARGUMENT, f"unknown value {value!r} for enum {name}")
    if isinstance(value, int) and not isinstance(value, bool) and value in names.values():
        return value
    raise EtcdError(INVALID_ARGUMENT, f"unknown value {value!r} for enum {name}")


def parse_range_end(obj: dict, key: bytes) -> bytes | None:
    """`range_end` as the service wants it: None for a single key, b"\\0" for "every key
    >= key" (etcd's encoding, also when both are "\\0": all keys)."""
    end = parse_bytes(obj, "range_end")
    if not end:
        return None
    return end


@dataclasses.dataclass(frozen=True)
class RangeRequest:
    """etcd's RangeRequest, parsed. What the service cannot do (sort, min/max filters)
    the gateway does over its results (`shape_range`)."""

    key: bytes
    end: bytes | None
    limit: int = 0
    revision: int = 0
    sort_order: int = 0
    sort_target: int = 0
    serializable: bool = False
    keys_only: bool = False
    count_only: bool = False
    min_mod_revision: int = 0
    max_mod_revision: int = 0
    min_create_revision: int = 0
    max_create_revision: int = 0

    @property
    def sorted(self) -> bool:
        """True when etcd sorts (and so fetches everything before applying limit)."""
        return self.sort_order != 0 or self.sort_target != 0

    @property
    def filtered(self) -> bool:
        return bool(self.min_mod_revision or self.max_mod_revision or self.min_create_revision or self.max_create_revision)

    @property
    def service_limit(self) -> int | None:
        """The limit to ask the service for: none when sorting or filtering comes after."""
        if self.sorted or self.filtered or not self.limit:
            return None
        return self.limit


def parse_range(obj: dict) -> RangeRequest:
    key = parse_bytes(obj, "key")
    if not key:
        raise EtcdError(INVALID_ARGUMENT, ERR_KEY_NOT_PROVIDED)
    request = RangeRequest(
        key=key,
        end=parse_range_end(obj, key),
        limit=parse_int(obj, "limit"),
        revision=parse_int(obj, "revision"),
        sort_order=parse_enum(obj, "sort_order", SORT_ORDERS),
        sort_target=parse_enum(obj, "sort_target", SORT_TARGETS),
        serializable=parse_bool(obj, "serializable"),
        keys_only=parse_bool(obj, "keys_only"),
        count_only=parse_bool(obj, "count_only"),
        min_mod_revision=parse_int(obj, "min_mod_revision"),
        max_mod_revision=parse_int(obj, "max_mod_revision"),
        min_create_revision=parse_int(obj, "min_create_revision"),
        max_create_revision=parse_int(obj, "max_create_revision"),
    )
    if request.limit < 0 or request.revision < 0:
        raise EtcdError(INVALID_ARGUMENT, "etcdserver: limit and revision must not be negative")
    return request


def shape_range(request: RangeRequest, result: RangeResult) -> tuple[list[KeyValue], bool, int]:
    """(kvs, more, count) as etcd 3.4's Range computes them from the store's answer:
    filter by min/max revisions (count stays the store's count), sort, then cut at limit.

        >>> kvs = [KeyValue(b"a", b"1", 2, 5, 1), KeyValue(b"b", b"2", 3, 3, 1)]
        >>> shape_range(RangeRequest(b"a", b"c", limit=1, sort_order=2, sort_target=3), RangeResult(5, kvs, False, 2))[0][0].key
        b'a'
    """
    kvs = list(result.items)
    if request.filtered:
        kvs = [kv for kv in kvs if _passes(request, kv)]
    order = request.sort_order
    if request.sort_target != 0 and order == 0:
        order = 1  # etcd: a sort target without an order sorts ascending
    if order != 0 and not (order == 1 and request.sort_target == 0):
        kvs.sort(key=_SORT_FIELD[request.sort_target], reverse=order == 2)
    more = bool(result.more)
    if request.limit and len(kvs) > request.limit:
        kvs = kvs[: request.limit]
        more = True
    return kvs, more, result.count


def _passes(request: RangeRequest, kv: KeyValue) -> bool:
    if request.min_mod_revision and kv.mod_revision < request.min_mod_revision:
        return False
    if request.max_mod_revision and kv.mod_revision > request.max_mod_revision:
        return False
    if request.min_create_revision and kv.create_revision < request.min_create_revision:
        return False
    if request.max_create_revision and kv.create_revision > request.max_create_revision:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class PutRequest:
    key: bytes
    value: bytes
    lease: int = 0
    prev_kv: bool = False
    ignore_value: bool = False
    ignore_lease: bool = False


def parse_put(obj: dict) -> PutRequest:
    key = parse_bytes(obj, "key")
    if not key:
        raise EtcdError(INVALID_ARGUMENT, ERR_KEY_NOT_PROVIDED)
    request = PutRequest(
        key=key,
        value=parse_bytes(obj, "value"),
        lease=parse_int(obj, "lease"),
        prev_kv=parse_bool(obj, "prev_kv"),
        ignore_value=parse_bool(obj, "ignore_value"),
        ignore_lease=parse_bool(obj, "ignore_lease"),
    )
    if request.ignore_value and request.value:
        raise EtcdError(INVALID_ARGUMENT, ERR_VALUE_PROVIDED)
    if request.ignore_lease and request.lease:
        raise EtcdError(INVALID_ARGUMENT, ERR_LEASE_PROVIDED)
    return request


@dataclasses.dataclass(frozen=True)
class DeleteRequest:
    key: bytes
    end: bytes | None
    prev_kv: bool = False


def parse_delete(obj: dict) -> DeleteRequest:
    key = parse_bytes(obj, "key")
    if not key:
        raise EtcdError(INVALID_ARGUMENT, ERR_KEY_NOT_PROVIDED)
    return DeleteRequest(key=key, end=parse_range_end(obj, key), prev_kv=parse_bool(obj, "prev_kv"))


@dataclasses.dataclass(frozen=True)
class TxnRequest:
    """A txn for the service, plus the range requests whose sort/filter the gateway
    applies afterwards (keyed by their path of indexes: (branch, i, branch, j, ...))."""

    compare: tuple[Compare, ...]
    success: tuple[TxnOp, ...]
    failure: tuple[TxnOp, ...]
    ranges: dict


def parse_txn(obj: dict, depth: int = 0, path: tuple = ()) -> TxnRequest:
    """etcd's TxnRequest -> the service's Compare/TxnOp, with etcd's checks first: too
    many ops, a key put twice (or put and deleted) in one branch."""
    if depth > MAX_TXN_DEPTH:
        raise EtcdError(INVALID_ARGUMENT, f"etcdserver: txns nest at most {MAX_TXN_DEPTH} deep")
    compares = _list(obj, "compare")
    success = _list(obj, "success")
    failure = _list(obj, "failure")
    if max(len(compares), len(success), len(failure)) > MAX_TXN_OPS:
        raise EtcdError(INVALID_ARGUMENT, ERR_TOO_MANY_OPS)
    ranges: dict = {}
    parsed_compares = tuple(parse_compare(c) for c in compares)
    branches = []
    for name, ops in (("success", success), ("failure", failure)):
        parsed = []
        for index, op in enumerate(ops):
            txn_op, nested_ranges = parse_request_op(op, depth, path + (name, index))
            parsed.append(txn_op)
            ranges.update(nested_ranges)
        branches.append(tuple(parsed))
        check_branch_writes(branches[-1])
    return TxnRequest(parsed_compares, branches[0], branches[1], ranges)


def _list(obj: dict, name: str) -> list:
    value = obj.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise EtcdError(INVALID_ARGUMENT, f"json: cannot unmarshal {_go_type(value)} into Go value of type []*etcdserverpb ({name})")
    return value


def parse_compare(obj: dict) -> Compare:
    key = parse_bytes(obj, "key")
    target = parse_enum(obj, "target", COMPARE_TARGETS)
    result = parse_enum(obj, "result", COMPARE_RESULTS)
    service_target, field = _COMPARE_TARGET[target]
    value: bytes | int = parse_bytes(obj, field) if target == 3 else parse_int(obj, field)
    return Compare(key=key, target=service_target, op=_COMPARE_OP[result], value=value, end=parse_range_end(obj, key))


def parse_request_op(obj: dict, depth: int, path: tuple) -> tuple[TxnOp, dict]:
    kinds = [k for k in ("request_range", "request_put", "request_delete_range", "request_txn") if obj.get(k) is not None]
    if len(kinds) != 1:
        raise EtcdError(INVALID_ARGUMENT, "etcdserver: a txn op needs exactly one of request_range, request_put, "
                                          "request_delete_range, request_txn")  # fmt: skip
    kind = kinds[0]
    body = obj[kind]
    if not isinstance(body, dict):
        raise EtcdError(INVALID_ARGUMENT, f"json: cannot unmarshal {_go_type(body)} into Go value of type {kind}")
    if kind == "request_range":
        request = parse_range(body)
        op = TxnOp(op="get", key=request.key, end=request.end, limit=request.service_limit,
                   keys_only=request.keys_only, count_only=request.count_only and not request.filtered,
                   revision=request.revision or None)  # fmt: skip
        return op, {path: request}
    if kind == "request_put":
        request = parse_put(body)
        if request.ignore_value or request.ignore_lease:
            raise EtcdError(INVALID_ARGUMENT, "etcdserver: ignore_value and ignore_lease are not supported inside a txn by this gateway")
        return TxnOp(op="put", key=request.key, value=request.value, lease=request.lease, prev=request.prev_kv), {}
    if kind == "request_delete_range":
        request = parse_delete(body)
        return TxnOp(op="delete", key=request.key, end=request.end, prev=request.prev_kv), {}
    nested = parse_txn(body, depth + 1, path)
    return TxnOp(op="txn", compare=nested.compare, success=nested.success, failure=nested.failure), nested.ranges


def check_branch_writes(ops: Iterable[TxnOp]) -> tuple[set, list]:
    """etcd's duplicate-key rule for one branch: no key put twice, none put and deleted.
    A nested txn's two branches may overlap each other, not the enclosing branch."""
    puts: set[bytes] = set()
    deletes: list[tuple[bytes, bytes | None]] = []
    for op in ops:
        if op.op == "put":
            if op.key in puts:
                raise EtcdError(INVALID_ARGUMENT, ERR_DUPLICATE_KEY)
            puts.add(op.key)
        elif op.op == "delete":
            deletes.append((op.key, op.end))
        elif op.op == "txn":
            nested_puts: set[bytes] = set()
            for branch in (op.success, op.failure):
                branch_puts, branch_deletes = check_branch_writes(branch)
                nested_puts |= branch_puts
                deletes += branch_deletes
            if nested_puts & puts:
                raise EtcdError(INVALID_ARGUMENT, ERR_DUPLICATE_KEY)
            puts |= nested_puts
    for key in puts:
        if any(_in_range(key, start, end) for start, end in deletes):
            raise EtcdError(INVALID_ARGUMENT, ERR_DUPLICATE_KEY)
    return puts, deletes


def _in_range(key: bytes, start: bytes, end: bytes | None) -> bool:
    if end is None:
        return key == start
    if end == b"\0":
        return key >= start
    return start <= key < end


# --- response rendering --------------------------------------------------------------------


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def node_number(text: str) -> int:
    """A stable uint64 for a node id or cluster name, as etcd shows member and cluster ids
    (nonzero: zero would be left out of every response)."""
    number = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return number or 1


@dataclasses.dataclass(frozen=True)
class Header:
    """What goes into every response header; `render` leaves zero fields out."""

    cluster_id: int
    member_id: int
    raft_term: int

    def render(self, revision: int = 0) -> dict:
        return omit_defaults({"cluster_id": str(self.cluster_id), "member_id": str(self.member_id),
                              "revision": str(revision) if revision else "", "raft_term": str(self.raft_term) if self.raft_term else ""})  # fmt: skip


def omit_defaults(obj: dict) -> dict:
    """Drop fields at their default value, as etcd's marshaller does (EmitDefaults off)."""
    return {k: v for k, v in obj.items() if v not in (None, "", "0", 0, False, [], {})}


def render_kv(kv: KeyValue, *, keys_only: bool = False) -> dict:
    return omit_defaults({
        "key": b64(kv.key),
        "create_revision": str(kv.create_revision),
        "mod_revision": str(kv.mod_revision),
        "version": str(kv.version),
        "value": b64(kv.value) if kv.value and not keys_only else "",
        "lease": str(kv.lease),
    })  # fmt: skip


def render_range(header: dict, request: RangeRequest, result: RangeResult) -> dict:
    kvs, more, count = shape_range(request, result)
    body: dict[str, Any] = {"header": header}
    if not request.count_only:
        body["kvs"] = [render_kv(kv, keys_only=request.keys_only) for kv in kvs]
    body["more"] = more
    body["count"] = str(count)
    return omit_defaults(body)


def render_put(header: dict, result: PutResult, prev_kv: bool) -> dict:
    body: dict[str, Any] = {"header": header}
    if prev_kv and result.prev is not None:
        body["prev_kv"] = render_kv(result.prev)
    return body


def render_delete(header: dict, result: DeleteResult, prev_kv: bool) -> dict:
    body: dict[str, Any] = {"header": header, "deleted": str(result.deleted)}
    if prev_kv:
        body["prev_kvs"] = [render_kv(kv) for kv in result.prev]
    return omit_defaults(body)


def render_txn(header: dict, request: TxnRequest, result: TxnResult, path: tuple = ()) -> dict:
    """A TxnResponse; inner responses carry `header: {revision}` (the txn's revision),
    a nested txn an empty header, as etcd 3.4 answers (059-txn-nested-request_txn.txt)."""
    inner_header = {"revision": str(result.revision)} if result.revision else {}
    branch = "success" if result.succeeded else "failure"
    ops = request.success if result.succeeded else request.failure
    responses = []
    for index, (op, response) in enumerate(zip(ops, result.responses)):
        where = path + (branch, index)
        if op.op == "get":
            range_request = request.ranges.get(where) or RangeRequest(op.key, op.end)
            responses.append({"response_range": render_range(dict(inner_header), range_request, response)})
        elif op.op == "put":
            responses.append({"response_put": render_put(dict(inner_header), response, op.prev)})
        elif op.op == "delete":
            responses.append({"response_delete_range": render_delete(dict(inner_header), response, op.prev)})
        else:
            nested = TxnRequest(op.compare, op.success, op.failure, request.ranges)
            responses.append({"response_txn": render_txn({}, nested, response, where)})
    body: dict[str, Any] = {"header": header}  # kept even when empty (a nested txn's)
    body.update(omit_defaults({"succeeded": bool(result.succeeded), "responses": responses}))
    return body


def render_event(event: WatchEvent) -> dict:
    body: dict[str, Any] = {}
    if event.type == "delete":
        body["type"] = "DELETE"
        body["kv"] = omit_defaults({"key": b64(event.kv.key), "mod_revision": str(event.kv.mod_revision)})
    else:
        body["kv"] = render_kv(event.kv)
    if event.prev is not None:
        body["prev_kv"] = render_kv(event.prev)
    return body


__all__ = [name for name in dir() if not name.startswith("_") and name not in ("annotations", "dataclasses", "Any", "Iterable")]
