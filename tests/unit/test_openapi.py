"""The Admin API's OpenAPI document: built from the checks' schemas, complete, shipped.

The document cannot drift from the schemas (it is built from them when
asked), but it can drift from the routes Flask serves and from the copy in
docs/: both are checked here.  Its schemas must be valid JSON Schema 2020-12
(OpenAPI 3.1's dialect), every ``$ref`` must resolve, and it is served to a
key holder (a viewer too) and to nobody else.  test_admin_fuzz.py then
fuzzes a live gproxy from it.
"""

import json
import pathlib
import re

import pytest
from jsonschema import Draft202012Validator

from gproxy.admin import openapi
from gproxy.admin.app import create_app
from gproxy.config import Config
from gproxy.model.resources import STREAM_PLUGINS, UPSTREAM_SCHEMA
from gproxy.proxy.sessions.live import LiveSessions
from gproxy.proxy.sessions.registry import Registry
from gproxy.store.file import FileStore

DOCS_COPY = pathlib.Path(__file__).resolve().parents[2] / "docs" / "admin-api.openapi.json"
KEY = "edd1c9f034335f136f87ad84b625c8f1"
VIEWER = "viewer-key-0123456789abcdef012345"
CONF = {"apisix": {"stream_proxy": {"tcp": [9100]}},
        "deployment": {"admin": {"admin_key": [{"name": "admin", "key": KEY, "role": "admin"},
                                               {"name": "v", "key": VIEWER, "role": "viewer"}]}}}


@pytest.fixture(scope="module")
def doc():
    return openapi.document()


@pytest.fixture
def app(tmp_path):
    return create_app(FileStore(tmp_path / "apisix.yaml"), LiveSessions(Registry()), Config(CONF))


def test_the_copy_in_docs_is_what_gproxy_serves():
    assert DOCS_COPY.read_text() == openapi.text(), (
        "docs/admin-api.openapi.json is out of date: regenerate it with\n"
        "    .venv/bin/python -m gproxy.admin.openapi > docs/admin-api.openapi.json")


def test_every_schema_is_json_schema_2020_12_and_every_ref_resolves(doc):
    schemas = doc["components"]["schemas"]
    for name, schema in schemas.items():
        Draft202012Validator.check_schema(schema)
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs and refs <= set(schemas), refs - set(schemas)


def _documented(doc):
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item
            if method != "parameters"}


def _flask_path(rule):
    path = re.sub(r"<(?:path:)?sub_path>", "{field}", rule)
    path = path.replace("<id_>", "{id}")
    return re.sub(r"<(\w+)>", r"{\1}", path)


def test_every_admin_route_flask_serves_is_documented(doc, app):
    served = {(method, _flask_path(rule.rule)) for rule in app.url_map.iter_rules()
              if rule.rule.startswith(openapi.PREFIX)
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert served - _documented(doc) == set()
    extra = _documented(doc) - served
    assert extra == {("GET", "/apisix/admin/gproxy/health")}  # added by the runtime


def test_the_schemas_are_the_checks_own(doc):
    """Built from the objects the checks use: a bound added there is here at once."""
    schemas = doc["components"]["schemas"]
    assert schemas["Upstream"]["properties"]["nodes"] == UPSTREAM_SCHEMA["properties"]["nodes"]
    route = schemas["StreamRouteInput"]
    assert route["properties"]["upstream"] == {"$ref": "#/components/schemas/UpstreamInput"}
    assert set(route["properties"]["plugins"]["properties"]) == set(STREAM_PLUGINS)
    assert "create_time" not in route["properties"]  # a write may not send them
    assert "key" not in schemas["SSL"]["properties"]  # never in an answer


@pytest.mark.parametrize("body, valid", [
    ({"upstream": {"type": "roundrobin", "nodes": {"127.0.0.1:1883": 1}}}, True),
    ({"server_port": 9100, "plugins": {"mqtt-proxy": {"protocol_level": 4}},
      "upstream": {"nodes": [{"host": "127.0.0.1", "port": 1883, "weight": 1}]}}, True),
    ({"plugins": {"no-such-plugin": {}}}, False),
    ({"server_port": 0}, False),
    ({"create_time": 1}, False),
    ({"upstream": {"nodes": {"127.0.0.1:1883": -1}}}, False),
])
def test_the_document_judges_route_bodies_like_the_checks(doc, body, valid):
    from referencing import Registry as Refs, Resource
    refs = Refs().with_resource("urn:doc", Resource.opaque(doc))
    schema = {"$ref": "urn:doc#/components/schemas/StreamRouteInput"}
    ok = Draft202012Validator(schema, registry=refs).is_valid(body)
    assert ok == valid


def test_it_is_served_to_key_holders_only(app, doc):
    client = app.test_client()
    path = "/apisix/admin/gproxy/openapi.json"
    for key in (KEY, VIEWER):
        resp = client.get(path, headers={"X-API-KEY": key})
        assert resp.status_code == 200 and resp.mimetype == "application/json"
        assert json.loads(resp.get_data()) == doc
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"X-API-KEY": "nope"}).status_code == 401
