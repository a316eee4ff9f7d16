"""Placeholders for the cp-only endpoints (txn, leases, watch, compaction).

In ap mode they are `501 not_supported_in_mode` for good, naming cp as the mode that
offers them. In cp mode they are `501 not_implemented` until they are wired to the
service: replace the handler in `CP_ONLY_ROUTES` (or register the real routes in its
place) when the CPService grows `txn`, leases, `watch` and `compact`.
"""
from __future__ import annotations

from aiohttp import web

from api.errors import NotImplementedYet, not_in_mode
from api.routes.common import service_of

# (method, path, feature name for messages)
CP_ONLY_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("POST", "/v1/txn", "transactions"),
    ("GET", "/v1/leases", "leases"),
    ("POST", "/v1/leases", "leases"),
    ("GET", "/v1/leases/{id}", "leases"),
    ("DELETE", "/v1/leases/{id}", "leases"),
    ("POST", "/v1/leases/{id}/keepalive", "leases"),
    ("GET", "/v1/watch", "watch"),
    ("GET", "/v1/watch/{key:.*}", "watch"),
    ("POST", "/v1/compact", "compaction"),
)


def _placeholder(feature: str):
    async def handler(request: web.Request) -> web.Response:
        service = service_of(request)
        if service.mode != "cp":
            raise not_in_mode(feature, service.mode, "cp")
        raise NotImplementedYet(f"{feature} is not implemented yet")

    handler.__name__ = f"cp_only_{feature}"
    return handler


def add_routes(app: web.Application) -> None:
    for method, path, feature in CP_ONLY_ROUTES:
        app.router.add_route(method, path, _placeholder(feature))
