"""/v1/openapi.json stays true: every registered route is documented with its methods and
query parameters, and nothing documented is missing from the app."""
from __future__ import annotations

import re

from api.app import make_app
from api.openapi import build_openapi
from api.routes import kv
from tests.api.conftest import node_config
from tests.api.fakes import FakeAPService, FakeCPService

IGNORED_METHODS = {"HEAD", "OPTIONS"}


def registered_routes() -> set[tuple[str, str]]:
    routes = set()
    for service in (FakeCPService(node_config()), FakeAPService(node_config())):
        app = make_app(service, node_config())
        for route in app.router.routes():
            if route.method in IGNORED_METHODS:
                continue
            path = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", route.resource.canonical)
            routes.add((path, route.method.lower()))
    return routes


def documented_routes(doc: dict) -> set[tuple[str, str]]:
    return {(path, method) for path, ops in doc["paths"].items() for method in ops}


def test_every_route_is_documented_and_every_documented_route_exists():
    doc = build_openapi("test")
    registered = registered_routes()
    documented = documented_routes(doc)
    assert registered - documented == set(), "routes missing from api/openapi.py"
    assert documented - registered == set(), "documented routes the app does not serve"


def test_kv_query_parameters_match_what_the_handlers_accept():
    doc = build_openapi("test")

    def names(path, method):
        return {p["name"] for p in doc["paths"][path][method]["parameters"] if p["in"] == "query"}

    assert names("/v1/kv/{key}", "get") == set(kv.CP_GET + kv.AP_GET)
    assert names("/v1/kv/{key}", "put") == set(kv.CP_PUT + kv.AP_PUT)
    assert names("/v1/kv/{key}", "delete") == set(kv.CP_DELETE + kv.AP_DELETE)
    assert names("/v1/kv", "get") == set(kv.CP_RANGE + kv.AP_RANGE)


def test_path_parameters_are_declared():
    doc = build_openapi("test")
    for path, ops in doc["paths"].items():
        in_path = set(re.findall(r"\{(\w+)\}", path))
        for method, op in ops.items():
            declared = {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert declared == in_path, (path, method)
            assert "200" in op["responses"]


async def test_served_document_is_the_built_one(cp):
    r = await cp.get("/v1/openapi.json")
    assert r.status == 200
    body = await r.json()
    assert body["openapi"].startswith("3.")
    assert documented_routes(body) == documented_routes(build_openapi("x"))
