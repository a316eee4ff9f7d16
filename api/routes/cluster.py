"""`/v1/cluster`: status, where a key lives (ap), and membership changes.

    GET    /v1/cluster                  -> service.status()
    GET    /v1/cluster/preflist/{key}   -> service.preflist(key)            (ap only)
    POST   /v1/cluster/members          {"id", "client_url", "peer_address"} -> service.add_member
    DELETE /v1/cluster/members/{id}     -> service.remove_member(id)

A service without `add_member`/`remove_member` answers 501 `not_implemented`.
"""
from __future__ import annotations

import json

from aiohttp import web

from api.errors import NotImplementedYet, invalid, json_response, not_in_mode
from api.routes.common import Params, key_from_path, limits_of, service_of
from api.routes.cp_only import read_at_most
from api.service import Member

PREFLIST_ROUTE_PREFIX = "/v1/cluster/preflist/"
MEMBER_FIELDS = ("id", "client_url", "peer_address")


async def cluster_status(request: web.Request) -> web.Response:
    Params(request, ())
    return json_response(await service_of(request).status())


async def preflist(request: web.Request) -> web.Response:
    service = service_of(request)
    key = key_from_path(request, PREFLIST_ROUTE_PREFIX)
    Params(request, ())
    if service.mode != "ap":
        raise not_in_mode("the preference list", service.mode, "ap")
    return json_response(service.preflist(key))


async def add_member(request: web.Request) -> web.Response:
    service = service_of(request)
    Params(request, ())
    member = await _read_member(request)
    if not hasattr(service, "add_member"):
        raise NotImplementedYet(f"adding members is not implemented yet in {service.mode} mode")
    return json_response(await service.add_member(member))


async def remove_member(request: web.Request) -> web.Response:
    service = service_of(request)
    Params(request, ())
    member_id = request.match_info["member_id"]
    if not hasattr(service, "remove_member"):
        raise NotImplementedYet(f"removing members is not implemented yet in {service.mode} mode")
    return json_response(await service.remove_member(member_id))


async def _read_member(request: web.Request) -> Member:
    from clusters.spec import NODE_ID_PATTERN, SpecError, check_client_url, check_peer_address

    limit = limits_of(request).max_json_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise invalid("body", f"the body is over {limit} bytes")
    raw = await read_at_most(request, limit)
    if raw is None:
        raise invalid("body", f"the body is over {limit} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise invalid("body", 'the body must be JSON: {"id": "n4", "client_url": "http://host:port", "peer_address": "host:port"}') from None
    if not isinstance(data, dict):
        raise invalid("body", "the body must be a JSON object with id, client_url and peer_address")
    missing = [f for f in MEMBER_FIELDS if not isinstance(data.get(f), str)]
    if missing:
        raise invalid("body", f"the member needs string fields {', '.join(missing)}")
    unknown = sorted(set(data) - set(MEMBER_FIELDS))
    if unknown:
        raise invalid("body", f"unknown field(s) {', '.join(unknown)}; a member has {', '.join(MEMBER_FIELDS)}")
    if not NODE_ID_PATTERN.match(data["id"]):
        raise invalid("member_id", "id must be 1-64 letters, digits, '.', '_' or '-'")
    try:
        client_url = check_client_url(data["client_url"], "member")
        peer_address = check_peer_address(data["peer_address"], "member")
    except SpecError as exc:
        raise invalid("body", str(exc)) from None
    return Member(id=data["id"], client_url=client_url, peer_address=peer_address)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/cluster", cluster_status)
    app.router.add_get("/v1/cluster/preflist/{key:.*}", preflist)
    app.router.add_post("/v1/cluster/members", add_member)
    app.router.add_delete("/v1/cluster/members/{member_id}", remove_member)
