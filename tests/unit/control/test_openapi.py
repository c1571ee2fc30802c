"""The OpenAPI 3.1 document of ``/v1`` (``bridge/openapi.json``), read as a file.

- it is a valid OpenAPI 3.1 document, every ``$ref`` resolves and every example
  validates against its schema;
- ``docs/openapi.json`` is a relative symbolic link to it (one document, two places);
  the package ships it (``package-data``), so the server can serve it when installed;
- it documents exactly the operations listed here (a new route must be added to the
  document and to :data:`OPERATIONS`);
- every error reply is the one ``Error`` schema (``{"error", "parameter"}``); a 401
  says ``WWW-Authenticate``, a 503 says ``Retry-After``; every operation but the
  document itself needs a bearer token with one scope;
- it agrees with the code's own names and bounds (query parameters, lease request
  members, kinds, statuses, lengths);
- ``docs/control-api.md`` names every path, lease member and NATS subject.

What the real server answers is checked against the document by
``tests/integration/control/test_openapi.py``.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

import bridge.control.core as control
from bridge.upstream.client import SubscriptionStatus

ROOT = Path(__file__).resolve().parents[3]
DOCUMENT = ROOT / "bridge" / "openapi.json"
DOCS_LINK = ROOT / "docs" / "openapi.json"
REFERENCE = ROOT / "docs" / "control-api.md"
#: where the document is registered for ``$ref`` resolution in these tests
BASE = "urn:aleno-bridge:openapi"

#: every operation under /v1, and the scope it needs (``None``: no token needed)
OPERATIONS: dict[tuple[str, str], str | None] = {
    ("get", "/v1/snapshot"): "snapshot",
    ("post", "/v1/subscriptions"): "lease",
    ("post", "/v1/subscriptions/{lease}/renew"): "lease",
    ("delete", "/v1/subscriptions/{lease}"): "lease",
    ("get", "/v1/openapi.json"): None,
}
#: the statuses each operation documents
STATUSES: dict[tuple[str, str], set[str]] = {
    ("get", "/v1/snapshot"): {"200", "400", "401", "403", "503"},
    ("post", "/v1/subscriptions"): {"200", "400", "401", "403", "408", "409", "413", "415",
                                    "429"},
    ("post", "/v1/subscriptions/{lease}/renew"):
        {"200", "400", "401", "403", "404", "408", "409", "413", "415"},
    ("delete", "/v1/subscriptions/{lease}"): {"204", "400", "401", "403", "404", "409"},
    ("get", "/v1/openapi.json"): {"200"},
}
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
ERROR = "#/components/schemas/Error"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DOCUMENT.read_bytes())
    return loaded


def pointer(doc: dict[str, Any], ref: str) -> Any:
    """The target of a local ``$ref`` (``#/a/b~1c``)."""
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def deref(doc: dict[str, Any], node: Any) -> Any:
    """``node``, or what its ``$ref`` points at (followed until it is no reference)."""
    while isinstance(node, dict) and "$ref" in node:
        node = pointer(doc, node["$ref"])
    return node


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                yield method, path, item[method]


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def validator(doc: dict[str, Any], location: str) -> Draft202012Validator:
    """A validator of the schema at ``location`` (a JSON pointer into the document),
    its ``$ref`` resolved against the document."""
    registry: Registry[Any] = Registry().with_resource(
        BASE, Resource.from_contents(doc, default_specification=DRAFT202012))
    return Draft202012Validator({"$ref": f"{BASE}{location}"}, registry=registry,
                                format_checker=Draft202012Validator.FORMAT_CHECKER)


def escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


# -- the document -------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1.")
    validate(doc, cls=OpenAPIV31SpecValidator)
    # JSON as plain as it gets: UTF-8, one trailing newline, no duplicate keys
    text = DOCUMENT.read_text(encoding="utf-8")
    assert text.endswith("}\n")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), keys
        return dict(pairs)
    json.loads(text, object_pairs_hook=no_duplicates)


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    found = set(refs(doc))
    assert found
    for ref in found:
        pointer(doc, ref)
    # and every component is used
    for kind, components in doc["components"].items():
        if kind == "securitySchemes":
            continue
        for name in components:
            assert f"#/components/{kind}/{name}" in found, f"unused {kind}/{name}"


def test_docs_holds_a_relative_link_to_the_same_bytes() -> None:
    assert DOCS_LINK.is_symlink()
    target = os.readlink(DOCS_LINK)
    assert not os.path.isabs(target) and target == "../bridge/openapi.json"
    assert DOCS_LINK.resolve() == DOCUMENT.resolve()
    assert DOCS_LINK.read_bytes() == DOCUMENT.read_bytes()


def test_the_package_ships_the_document() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "openapi.json" in meta["tool"]["setuptools"]["package-data"]["bridge"]
    shipped = importlib.resources.files("bridge").joinpath("openapi.json")
    assert shipped.read_bytes() == DOCUMENT.read_bytes()


def test_the_server_and_the_security_scheme(doc: dict[str, Any]) -> None:
    assert [s["url"] for s in doc["servers"]] == ["http://127.0.0.1:9465"]
    scheme = doc["components"]["securitySchemes"]["bearer"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    assert set(scheme["x-scopes"]) == {"snapshot", "lease"}
    assert doc["security"] == [{"bearer": []}]


# -- the operations -------------------------------------------------------------------


def test_exactly_the_expected_operations_are_documented(doc: dict[str, Any]) -> None:
    found = {(method, path) for method, path, _ in operations(doc)}
    assert found == set(OPERATIONS)
    assert all(path.startswith("/v1/") for _, path in found)
    ids = [op["operationId"] for _, _, op in operations(doc)]
    assert len(ids) == len(set(ids))
    for method, path, op in operations(doc):
        assert set(op["responses"]) == STATUSES[(method, path)], (method, path)


def test_each_operation_needs_a_bearer_token_with_its_scope(doc: dict[str, Any]) -> None:
    scopes = set(doc["components"]["securitySchemes"]["bearer"]["x-scopes"])
    for method, path, op in operations(doc):
        scope = OPERATIONS[(method, path)]
        if scope is None:
            assert op["security"] == [], (method, path)
            assert "401" not in op["responses"]
            continue
        assert scope in scopes
        assert op["security"] == [{"bearer": [scope]}], (method, path)
        assert op["x-scopes"] == [scope], (method, path)
        assert {"401", "403"} <= set(op["responses"]), (method, path)


def test_every_error_reply_is_the_error_schema(doc: dict[str, Any]) -> None:
    seen = 0
    for method, path, op in operations(doc):
        for status, response in op["responses"].items():
            resolved = deref(doc, response)
            if int(status) < 400:
                continue
            seen += 1
            content = resolved["content"]
            assert set(content) == {"application/json"}, (method, path, status)
            assert content["application/json"]["schema"] == {"$ref": ERROR}, \
                (method, path, status)
            headers = {name: deref(doc, h) for name, h in resolved.get("headers", {}).items()}
            if status == "401":
                assert headers["WWW-Authenticate"]["required"] is True
                assert re.match(headers["WWW-Authenticate"]["schema"]["pattern"],
                                'Bearer realm="aleno-bridge"')
            if status == "503":
                assert headers["Retry-After"]["required"] is True
    assert seen >= 20
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "parameter"]
    assert set(error["properties"]) == {"error", "parameter"}
    assert error["properties"]["parameter"]["type"] == ["string", "null"]


def test_success_replies_and_request_bodies(doc: dict[str, Any]) -> None:
    paths = doc["paths"]
    lease = paths["/v1/subscriptions"]["post"]
    renew = paths["/v1/subscriptions/{lease}/renew"]["post"]
    release = paths["/v1/subscriptions/{lease}"]["delete"]
    assert lease["requestBody"]["required"] is True
    assert set(lease["requestBody"]["content"]) == {"application/json"}
    assert renew["requestBody"]["required"] is False
    assert set(renew["requestBody"]["content"]) == {"application/json"}
    assert "content" not in release["responses"]["204"]
    for op in (lease, renew):
        reply = deref(doc, op["responses"]["200"])
        assert reply["content"]["application/json"]["schema"] == \
            {"$ref": "#/components/schemas/Lease"}
    snapshot = paths["/v1/snapshot"]["get"]["responses"]["200"]
    assert snapshot["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/Snapshot"}


def test_every_example_validates_against_its_schema(doc: dict[str, Any]) -> None:
    checked = 0

    def walk(node: Any, at: str) -> None:
        nonlocal checked
        if isinstance(node, dict):
            schema_at = f"{at}/schema" if "schema" in node else None
            if schema_at is not None and isinstance(node.get("examples"), dict):
                for example in node["examples"].values():
                    validator(doc, schema_at).validate(example["value"])
                    checked += 1
            if schema_at is not None and "example" in node:
                validator(doc, schema_at).validate(node["example"])
                checked += 1
            # a Schema Object's own examples (a JSON array)
            if isinstance(node.get("examples"), list) and ("type" in node or
                                                          "properties" in node):
                for example in node["examples"]:
                    validator(doc, at).validate(example)
                    checked += 1
            for key, value in node.items():
                walk(value, f"{at}/{escape(key)}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{at}/{i}")

    walk(doc, "#")
    assert checked >= 8


def test_a_wrong_example_is_refused(doc: dict[str, Any]) -> None:
    """The check above can fail: a reply without ``parameter`` is no error reply."""
    check = validator(doc, "#/components/schemas/Error")
    assert not check.is_valid({"error": "x"})
    assert not validator(doc, "#/components/schemas/LeaseRequest").is_valid(
        {"kind": "ticker", "symbols": ["BTC/*"]})
    assert not validator(doc, "#/components/schemas/Snapshot").is_valid(
        {"shard": None, "count": 1, "items": [{"ageMs": 1, "event": {"id": "x"}}],
         "next": None})


# -- the document agrees with the code --------------------------------------------------


def test_the_snapshot_query_is_the_codes(doc: dict[str, Any]) -> None:
    params = [deref(doc, p) for p in doc["paths"]["/v1/snapshot"]["get"]["parameters"]]
    assert tuple(p["name"] for p in params) == control.PARAMETERS
    assert all(p["in"] == "query" and p["required"] is False for p in params)
    by_name = {p["name"]: p for p in params}
    assert tuple(by_name["kind"]["schema"]["enum"]) == control.KINDS
    assert str(control.MAX_PATTERNS) in by_name["symbols"]["description"]
    assert str(control.MAX_PATTERN_LEN) in by_name["symbols"]["description"]
    assert by_name["symbols"]["style"] == "form" and by_name["symbols"]["explode"] is True
    limit = by_name["limit"]["schema"]
    assert (limit["type"], limit["minimum"], limit["maximum"]) == ("integer", 1, 1_000_000)
    cursor = re.compile(doc["components"]["schemas"]["Cursor"]["pattern"])
    assert cursor.match(control.make_cursor("ticker", "ETH/USD"))
    assert control.parse_cursor("equity:AAPL") == ("equity", "AAPL")


def test_the_lease_request_is_the_codes(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    req = schemas["LeaseRequest"]
    assert tuple(req["properties"]) == control.LEASE_PARAMETERS
    assert req["additionalProperties"] is False  # the code refuses any other member
    assert tuple(req["properties"]["kind"]["enum"]) == control.LEASE_KINDS
    symbols = req["properties"]["symbols"]
    assert symbols["maxItems"] == control.MAX_LEASE_SYMBOLS
    assert symbols["items"]["maxLength"] == control.MAX_SYMBOL_LEN
    assert req["properties"]["holder"]["maxLength"] == control.MAX_HOLDER_LEN
    assert schemas["LeaseId"]["maxLength"] == control.MAX_LEASE_ID_LEN
    renew = schemas["RenewRequest"]
    assert set(renew["properties"]) == set(control.RENEW_PARAMETERS) - {"lease"}
    # the example request is one the code accepts as it is
    example = doc["paths"]["/v1/subscriptions"]["post"]["requestBody"]["content"][
        "application/json"]["examples"]["two"]["value"]
    parsed = control.lease_from_json(json.dumps(example).encode())
    assert parsed.symbols == tuple(example["symbols"])
    # and a glob is what the document refuses too
    assert not re.match(symbols["items"]["pattern"], "BTC/*")


def test_the_lease_reply_is_the_codes(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    statuses = schemas["SymbolAnswer"]["properties"]["status"]["enum"]
    assert {s.value for s in SubscriptionStatus} | {"evicted"} == set(statuses)
    assert set(schemas["Lease"]["required"]) == set(schemas["Lease"]["properties"])
    assert set(schemas["Snapshot"]["required"]) == set(schemas["Snapshot"]["properties"])


def test_the_body_limit_is_the_servers(doc: dict[str, Any]) -> None:
    import bridge.control.http

    limit = bridge.control.http.MAX_BODY_BYTES
    assert limit == 64 * 1024
    too_large = deref(doc, doc["paths"]["/v1/subscriptions"]["post"]["responses"]["413"])
    assert "64 KiB" in too_large["description"]


# -- the human reference ---------------------------------------------------------------


def test_the_reference_names_every_path_member_and_subject(doc: dict[str, Any]) -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    for _, path, _ in operations(doc):
        assert path in text, path
    for member in (*control.LEASE_PARAMETERS, *control.PARAMETERS, "ttlS", "expiresInS",
                   "owner", "ageMs"):
        assert f"`{member}`" in text or f'"{member}"' in text, member
    for status in ("accepted", "rejected", "limit", "error", "pending", "evicted"):
        assert f"`{status}`" in text, status
    for subject in (".snapshot", ".snapshot.<index>", ".subscribe", ".subscribe.<index>",
                    ".renew", ".release"):
        assert f"<prefix>{subject}`" in text, subject
    for header in ("Nats-Service-Error-Code", "Nats-Service-Error", "Authorization",
                   "WWW-Authenticate", "Retry-After"):
        assert header in text, header
    assert "openapi.json" in text
