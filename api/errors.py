"""Errors as the HTTP API renders them: `{"error": {"code", "message", ...details}}`.

Every error a client sees, from a service (`ServiceError`), from request validation
(`invalid(...)`), or from aiohttp's router (404, 405), leaves through `error_response`, so
the shape is the same everywhere:

    >>> error_response(400, "invalid_limit", "limit must be an integer from 1 to 10000").text
    '{"error": {"code": "invalid_limit", "message": "limit must be an integer from 1 to 10000"}}'
"""
from __future__ import annotations

import base64
import json
from typing import Any

from aiohttp import web

from api.service import InvalidRequest, NotSupportedInMode, ServiceError

JSON_CONTENT_TYPE = "application/json"


class NotImplementedYet(ServiceError):
    """501 for endpoints of the contract this build does not serve yet."""

    status = 501
    code = "not_implemented"


class MethodNotAllowed(ServiceError):
    status = 405
    code = "method_not_allowed"


class RouteNotFound(ServiceError):
    status = 404
    code = "not_found"


def invalid(param: str, message: str, **details: Any) -> InvalidRequest:
    """A 400 for query parameter `param`: code `invalid_<param>`."""
    return InvalidRequest(message, code=f"invalid_{param}", **details)


def not_in_mode(feature: str, mode: str, offered_by: str) -> NotSupportedInMode:
    return NotSupportedInMode(
        f"{feature} is not supported in {mode} mode; it is offered by {offered_by} mode "
        f"(start the cluster with --mode {offered_by})",
        mode=mode,
        offered_by=offered_by,
    )


_PLAIN_TYPES = (str, int, float, bool, type(None))


def to_jsonable(value: Any) -> Any:
    """Make service output JSON-safe: bytes become text when UTF-8, else base64."""
    # Most leaves are plain (every request's payload passes through here): out first.
    if type(value) in _PLAIN_TYPES:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(raw).decode("ascii")
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(to_jsonable(payload)),
        status=status,
        content_type=JSON_CONTENT_TYPE,
        headers=headers,
    )


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None, **details: Any) -> web.Response:
    body = {"code": code, "message": message}
    for key, value in details.items():
        if key not in body:
            body[key] = value
    return json_response({"error": body}, status=status, headers=headers)


def service_error_response(exc: ServiceError) -> web.Response:
    headers = None
    context = exc.details.get("context")
    if isinstance(context, str) and context:
        headers = {"X-Capkv-Context": context}
    return error_response(exc.status, exc.code, exc.message, headers=headers, **exc.details)


__all__ = [
    "MethodNotAllowed",
    "NotImplementedYet",
    "RouteNotFound",
    "error_response",
    "invalid",
    "json_response",
    "not_in_mode",
    "service_error_response",
    "to_jsonable",
]
