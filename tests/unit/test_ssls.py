"""The ``ssls`` resource: APISIX's schema and messages, the Admin API envelopes
with private keys never returned, the store, and which certificate a server
name selects (radixtree_sni.lua's rules).  Certificates come from trustme."""

import json
import os
import stat

import pytest
import trustme  # noqa: E402  (the test extra: a missing one must fail, not skip)

from gproxy.admin.app import create_app
from gproxy.config import Config
from gproxy.errors import SchemaError
from gproxy.model.ssls import CertIndex, check_ssl
from gproxy.proxy.accept.tlsctx import CertError, Certificates
from gproxy.proxy.sessions.registry import Registry
from gproxy.store.file import FileStore

KEY = {"X-API-KEY": "edd1c9f034335f136f87ad84b625c8f1"}


@pytest.fixture(scope="module")
def pem():
    ca = trustme.CA()
    leaf = ca.issue_cert("a.example")
    return {"cert": leaf.cert_chain_pems[0].bytes().decode(),
            "key": leaf.private_key_pem.bytes().decode(),
            "ca": ca.cert_pem.bytes().decode()}


def ssl_conf(pem, **extra):
    conf = {"cert": pem["cert"], "key": pem["key"], "sni": "a.example"}
    conf.update(extra)
    return conf


# -- schema and checks ---------------------------------------------------------

def test_valid_forms(pem):
    check_ssl(ssl_conf(pem))
    check_ssl({"cert": pem["cert"], "key": pem["key"], "snis": ["a.example", "*.b.example"]})
    check_ssl({"type": "client", "cert": pem["cert"], "key": pem["key"]})
    check_ssl(ssl_conf(pem, client={"ca": pem["ca"], "depth": 2}, status=0,
                       ssl_protocols=["TLSv1.3"], labels={"env": "prod"}))


@pytest.mark.parametrize("change,message", [
    ({"sni": None}, "invalid configuration: then clause did not match"),
    ({"snis": ["b.example"]}, "invalid configuration: then clause did not match"),
    ({"cert": "x" * 200}, "failed to parse cert: PEM_read_bio_X509_AUX() failed"),
    ({"key": "-----BEGIN PRIVATE KEY-----\n" + "A" * 60 + "\n-----END PRIVATE KEY-----"},
     "failed to parse key: PEM_read_bio_PrivateKey() failed"),
    ({"cert": "short"}, 'invalid configuration: property "cert" validation failed: '
                        "string too short, expected at least 128, got 5"),
    ({"foo": 1}, "invalid configuration: additional properties forbidden, found foo"),
    ({"certs": ["c" * 200]}, "mismatched number of certs and keys"),
    ({"client": {"ca": "z" * 200}}, "failed to validate client_cert: failed to parse cert: "
                                    "PEM_read_bio_X509_AUX() failed"),
    ({"status": 2}, 'invalid configuration: property "status" validation failed: '
                    "matches non of the enum values"),
])
def test_refused_with_apisix_messages(pem, change, message):
    conf = ssl_conf(pem, **change)
    conf = {k: v for k, v in conf.items() if v is not None}
    with pytest.raises(SchemaError) as info:
        check_ssl(conf)
    assert str(info.value) == message


# -- which certificate a name selects -------------------------------------------

def test_cert_index_exact_then_wildcard_one_label():
    index = CertIndex([{"id": 1, "sni": "*.x.com"}, {"id": 2, "snis": ["a.x.com", "Y.COM."]},
                       {"id": 3, "sni": "*.a.x.com"}, {"id": 4, "sni": "off.com", "status": 0},
                       {"id": 5, "sni": "client.com", "type": "client"}])
    assert index.match("a.x.com")["id"] == 2          # exact beats the wildcard loaded first
    assert index.match("b.x.com")["id"] == 1
    assert index.match("y.com")["id"] == 2            # stored names are normalised
    assert index.match("q.a.x.com")["id"] == 3        # the longer wildcard first
    assert index.match("q.b.x.com") is None           # *.x.com covers one label only
    assert index.match("x.com") is None
    assert index.match("off.com") is None and index.match("client.com") is None
    star = CertIndex([{"id": 9, "sni": "*"}, {"id": 1, "sni": "*.x.com"}])
    assert star.match("anything.example")["id"] == 9 and star.match("b.x.com")["id"] == 1


def test_contexts_are_built_once_and_rebuilt_when_the_object_changes(pem):
    conf = ssl_conf(pem, id=1)
    certs = Certificates([conf])
    ctx = certs.server(conf)
    assert certs.server(conf) is ctx
    same = Certificates([dict(conf)], previous=certs)
    assert same.server(dict(conf)) is ctx               # a route change keeps it
    changed = dict(conf, client={"ca": pem["ca"]})
    assert Certificates([changed], previous=certs).server(changed) is not ctx
    with pytest.raises(CertError):
        Certificates().server(dict(conf, key=pem["key"].replace("M", "N", 3)))


# -- the Admin API ---------------------------------------------------------------

@pytest.fixture
def api(tmp_path):
    store = FileStore(tmp_path / "apisix.yaml")
    app = create_app(store, Registry(), Config({"apisix": {"stream_proxy": {"tcp": [9100]}}}))
    return app.test_client(), store, tmp_path / "apisix.yaml"


def call(client, method, url, body=None):
    resp = client.open("/apisix/admin" + url, method=method, headers=KEY,
                       data=None if body is None else json.dumps(body),
                       environ_base={"REMOTE_ADDR": "127.0.0.1"})
    return resp.status_code, json.loads(resp.get_data(as_text=True))


def test_admin_ssls_never_return_private_keys(api, pem):
    client, store, path = api
    status, body = call(client, "PUT", "/ssls/1", ssl_conf(pem))
    assert status == 201 and body["key"] == "/apisix/ssls/1"
    assert "key" not in body["value"] and body["value"]["cert"] == pem["cert"]
    for status, body in (call(client, "GET", "/ssls/1"), call(client, "GET", "/ssls")):
        text = json.dumps(body)
        assert status == 200 and "PRIVATE KEY" not in text and pem["cert"][40:80] in text
    status, body = call(client, "PATCH", "/ssls/1", {"snis": ["a.example", "b.example"],
                                                    "sni": None})
    assert status == 200 and "key" not in body["value"], body
    assert store.get("ssls", "1").value["key"] == pem["key"]   # kept, only never shown
    status, body = call(client, "POST", "/ssls", ssl_conf(pem, sni="c.example"))
    assert status == 201 and len(body["value"]["id"]) == 20 and "key" not in body["value"]
    assert stat.S_IMODE(os.stat(str(path) + ".journal").st_mode) & 0o077 == 0  # owner-only
    store.fold()
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0    # keys: owner-only file
    assert "ssls:" in path.read_text()
    status, body = call(client, "DELETE", "/ssls/1")
    assert (status, body) == (200, {"deleted": "1", "key": "/apisix/ssls/1"})
    assert call(client, "GET", "/ssls/1") == (404, {"message": "Key not found"})


def test_admin_ssls_errors_change_nothing(api, pem):
    client, store, _ = api
    status, body = call(client, "PUT", "/ssls/1", {"cert": pem["cert"], "key": pem["key"]})
    assert (status, body) == (400, {"error_msg": "invalid configuration: then clause did not match"})
    status, body = call(client, "PUT", "/ssls/1", ssl_conf(pem, create_time=1))
    assert (status, body) == (400, {"error_msg": "the property is forbidden:  create_time"})
    assert store.list("ssls") == []


def test_chash_on_gproxy_variables_is_accepted(api):
    client, _, _ = api
    for key in ("mqtt_username", "tls_client_cn", "mqtt_client_id"):
        status, body = call(client, "PUT", "/upstreams/" + key, {
            "type": "chash", "key": key, "nodes": {"127.0.0.1:1883": 1}})
        assert status == 201, body
    status, body = call(client, "PUT", "/upstreams/x", {
        "type": "chash", "key": "mqtt_password", "nodes": {"127.0.0.1:1883": 1}})
    assert status == 400 and "failed to match pattern" in body["error_msg"]


def test_set_connect_is_checked(api):
    client, _, _ = api
    route = {"plugins": {"mqtt-proxy": {"protocol_level": 4,
                                        "set_connect": {"client_id": "$tls_client_cn"}}},
             "upstream": {"type": "roundrobin", "nodes": {"127.0.0.1:1883": 1}}}
    assert call(client, "PUT", "/stream_routes/1", route)[0] == 201
    route["plugins"]["mqtt-proxy"]["set_connect"] = {"password": "x"}
    status, body = call(client, "PUT", "/stream_routes/1", route)
    assert status == 400 and "additional properties forbidden, found password" in body["error_msg"]


def test_set_connect_and_websocket_passthrough_are_refused_together(api):
    client, _, _ = api
    route = {"plugins": {"mqtt-proxy": {
        "protocol_level": 4, "set_connect": {"client_id": "$tls_client_cn"},
        "websocket": {"enable": True, "mode": "passthrough"}}},
        "upstream": {"type": "roundrobin", "nodes": {"127.0.0.1:1883": 1}}}
    status, body = call(client, "PUT", "/stream_routes/1", route)
    assert (status, body["error_msg"]) == (400, "failed to check the configuration of stream "
                                           "plugin [mqtt-proxy]: set_connect cannot rewrite a "
                                           "CONNECT relayed in websocket passthrough mode")
    route["plugins"]["mqtt-proxy"]["websocket"]["mode"] = "terminate"
    assert call(client, "PUT", "/stream_routes/1", route)[0] == 201
