"""mqtts through gproxy: TLS listeners with certificates from the Admin API,
SNI routes, TLS to brokers, client certificates and the CONNECT rewrite.

Certificates are made at test time with trustme (a CA, a server certificate
for two tenants' names, a client certificate), brokers are real mosquitto
processes (one with a TLS listener), clients are paho over Python's ssl.
"""

import http.client
import json
import os
import socket
import ssl

import pytest

from tests import needs, packets
from tests.integration.conftest import HOST, Broker, mqtt_route, node, wait_listening
from tests.integration.helpers import CONNACK_OK, WAIT, Paho, expect_closed, http_call, recv_exact

import trustme  # noqa: E402  (the test extra: a missing one must fail, not skip)
mqtt = needs.module("paho.mqtt.client", "bash scripts/venv.sh test")

KEY = "edd1c9f034335f136f87ad84b625c8f1"


class Pki:
    """A CA, a server certificate for tenant-a and *.tenant-b, a device certificate,
    a broker certificate (tenant-a's name too: TLS to brokers passes the SNI on)."""

    def __init__(self, directory):
        self.dir = directory
        self.ca = trustme.CA()
        self.server = self.ca.issue_cert("tenant-a.example", "*.tenant-b.example")
        self.device = self.ca.issue_cert("device-7.example", common_name="device-7")
        self.broker = self.ca.issue_cert("tenant-a.example", "127.0.0.1")
        self.ca_file = self.write("ca.pem", self.ca.cert_pem.bytes())
        self.device.private_key_and_cert_chain_pem.write_to_path(self.path("device.pem"))
        self.broker.cert_chain_pems[0].write_to_path(self.path("broker.crt"))
        self.broker.private_key_pem.write_to_path(self.path("broker.key"))

    def path(self, name):
        return os.path.join(self.dir, name)

    def write(self, name, data):
        with open(self.path(name), "wb") as fh:
            fh.write(data)
        return self.path(name)

    def ssl_object(self, ssl_id, snis, leaf=None, **extra):
        leaf = leaf or self.server
        conf = {"id": ssl_id, "snis": snis,
                "cert": b"".join(p.bytes() for p in leaf.cert_chain_pems).decode(),
                "key": leaf.private_key_pem.bytes().decode()}
        conf.update(extra)
        return conf

    def client_context(self, sni, device=False):
        ctx = SniContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.ca_file)
        ctx.sni = sni
        if device:
            ctx.load_cert_chain(self.path("device.pem"))
        return ctx


class SniContext(ssl.SSLContext):
    """Sends ``sni`` (and checks the certificate against it) whatever host was dialled."""

    sni = None

    def wrap_socket(self, sock, server_hostname=None, **kwargs):
        return super().wrap_socket(sock, server_hostname=self.sni, **kwargs)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(str(tmp_path_factory.mktemp("pki")))


def tls_listener(*flags):
    """Config whose listeners are TLS (and ``flags``), in APISIX's object form."""
    def config(ports):
        entry = dict({"tls": True}, **{f: True for f in flags})
        return {"apisix": {"stream_proxy": {"tcp": [
            dict(entry, addr="%s:%d" % (HOST, p)) for p in ports]}},
            "gproxy": {"tls": {"handshake_timeout": 3}}}
    return config


def admin(proxy, method, path, body=None):
    wait_listening(proxy.admin_port, proxy.proc, what="gproxy admin")
    status, raw = http_call(proxy.admin_port, method, "/apisix/admin" + path,
                            None if body is None else json.dumps(body), {"X-API-KEY": KEY})
    return status, json.loads(raw)


def tls_dial(port, ctx):
    """A raw TLS socket through gproxy (the handshake done), or the SSLError."""
    sock = socket.create_connection((HOST, port), timeout=WAIT)
    try:
        return ctx.wrap_socket(sock, server_hostname="ignored")
    except (ssl.SSLError, OSError):
        sock.close()
        raise


def raw_mqtt(port, ctx, client_id):
    """CONNECT over TLS, expect CONNACK accepted; returns the TLS socket."""
    tls = tls_dial(port, ctx)
    tls.sendall(packets.connect_v311(client_id))
    packets.assert_packet(recv_exact(tls, 4), CONNACK_OK, "CONNACK")
    return tls


# -- TLS termination -------------------------------------------------------------

@pytest.mark.parametrize("level", [4, 5])
def test_paho_over_tls_through_gproxy_to_mosquitto(gproxy, mosquitto, pki, level):
    broker = mosquitto()
    proxy = gproxy([mqtt_route([node(broker)], level=level, type_="roundrobin")],
                   config=tls_listener())
    status, body = admin(proxy, "PUT", "/ssls/1", pki.ssl_object(1, ["tenant-a.example"]))
    assert status == 201, body
    assert "key" not in body["value"] and body["value"]["snis"] == ["tenant-a.example"]
    protocol = mqtt.MQTTv5 if level == 5 else mqtt.MQTTv311
    ctx = pki.client_context("tenant-a.example")
    with Paho("tls-sub-%d" % level, proxy.port, protocol, tls_context=ctx) as sub, \
            Paho("tls-pub-%d" % level, proxy.port, protocol, tls_context=ctx) as pub:
        sub.subscribe("secure/t", qos=1)
        pub.publish("secure/t", b"x" * 70000, qos=1)  # several TLS records
        assert sub.expect_message().payload == b"x" * 70000
        pub.publish("secure/t", b"small", qos=1)
        assert sub.expect_message().payload == b"small"
        line = proxy.wait_for_session_line(sub.local_port, "mqtt client id: tls-sub-%d" % level)
        assert "while" in line
    broker.wait_for_client("tls-pub-%d" % level)
    status, listed = admin(proxy, "GET", "/ssls")
    assert status == 200 and listed["total"] == 1
    assert "key" not in listed["list"][0]["value"] and "cert" in listed["list"][0]["value"]
    assert "PRIVATE KEY" not in proxy.log()


def test_two_tenants_by_sni_reach_two_brokers(gproxy, mosquitto, pki):
    a, b = mosquitto("tenant-a"), mosquitto("tenant-b")
    routes = [mqtt_route([node(a)], 1, type_="roundrobin", sni="tenant-a.example"),
              mqtt_route([node(b)], 2, type_="roundrobin", sni="*.tenant-b.example")]
    proxy = gproxy(routes, config=tls_listener())
    mark = proxy.mark()
    proxy.rewrite_routes(routes, ssls=[pki.ssl_object(
        1, ["tenant-a.example", "*.tenant-b.example"])])
    proxy.wait_for_log("route table updated", timeout=10, since=mark)
    raw_mqtt(proxy.port, pki.client_context("tenant-a.example"), "dev-a").close()
    raw_mqtt(proxy.port, pki.client_context("eu.tenant-b.example"), "dev-b").close()
    a.wait_for_client("dev-a")
    b.wait_for_client("dev-b")
    assert "dev-b" not in a.client_ids() and "dev-a" not in b.client_ids()


def test_wrong_sni_or_plain_tcp_is_refused(gproxy, mosquitto, pki):
    broker = mosquitto()
    routes = [mqtt_route([node(broker)], 1, type_="roundrobin", sni="tenant-a.example")]
    proxy = gproxy(routes, config=tls_listener())
    admin(proxy, "PUT", "/ssls/1", pki.ssl_object(1, ["tenant-a.example", "*.tenant-b.example"]))
    mark = proxy.mark()
    with pytest.raises(ssl.SSLError):  # no certificate for that name: a TLS alert
        tls_dial(proxy.port, pki.client_context("other.example"))
    proxy.wait_for_log("failed to find any SSL certificate by SNI: other.example", since=mark)
    with pytest.raises(ssl.SSLError):  # a wildcard certificate covers one label only
        tls_dial(proxy.port, pki.client_context("a.b.tenant-b.example"))
    # a certificate but no route for that name (and no route without sni)
    sock = tls_dial(proxy.port, pki.client_context("x.tenant-b.example"))
    sock.sendall(packets.connect_v311(b"nobody"))
    assert sock.recv(10) == b""
    proxy.wait_for_log("not hit any route", since=mark)
    plain = socket.create_connection((HOST, proxy.port), timeout=WAIT)
    plain.sendall(packets.connect_v311(b"plain"))
    expect_closed(plain)
    plain.close()
    proxy.wait_for_log("SSL_do_handshake() failed", since=mark)
    assert broker.client_ids() == []


def test_a_new_certificate_serves_the_next_handshake(gproxy, mosquitto, pki):
    broker = mosquitto()
    proxy = gproxy([mqtt_route([node(broker)], type_="roundrobin")], config=tls_listener())
    ctx = pki.client_context("tenant-a.example")
    with pytest.raises(ssl.SSLError):
        tls_dial(proxy.port, ctx)
    admin(proxy, "PUT", "/ssls/7", pki.ssl_object(7, ["tenant-a.example"]))
    live = raw_mqtt(proxy.port, ctx, "first")
    status, _ = admin(proxy, "DELETE", "/ssls/7")
    assert status == 200
    with pytest.raises(ssl.SSLError):
        tls_dial(proxy.port, ctx)
    live.sendall(packets.pingreq())  # the session that was live goes on
    assert recv_exact(live, 2) == b"\xd0\x00"
    live.close()


# -- TLS to brokers ----------------------------------------------------------------

@pytest.fixture
def tls_broker(tmp_path, pki):
    broker = Broker(str(tmp_path), "tls-broker")
    with open(broker.conf_path, "a") as fh:
        fh.write("certfile %s\nkeyfile %s\n" % (pki.path("broker.crt"), pki.path("broker.key")))
    broker.start()
    yield broker
    broker.stop()


def test_tls_to_a_tls_mosquitto_listener(gproxy, tls_broker, pki):
    """scheme: tls with verify: the client's SNI goes on to the broker and is checked."""
    upstream = {"type": "roundrobin", "scheme": "tls", "tls": {"verify": True},
                "nodes": [node(tls_broker)]}
    route = {"id": 1, "plugins": {"mqtt-proxy": {"protocol_level": 4}}, "upstream": upstream}

    def config(ports):
        return {"apisix": {"ssl": {"ssl_trusted_certificate": pki.ca_file},
                           "stream_proxy": {"tcp": [{"addr": "%s:%d" % (HOST, ports[0]),
                                                     "tls": True},
                                                    "%s:%d" % (HOST, ports[1])]}}}
    proxy = gproxy([route], config=config, listeners=2)
    admin(proxy, "PUT", "/ssls/1", pki.ssl_object(1, ["tenant-a.example", "*.tenant-b.example"]))
    # plain client, no SNI: APISIX's placeholder SNI, the chain alone is verified
    with Paho("plain-to-tls", proxy.ports[1]):
        tls_broker.wait_for_client("plain-to-tls")
    # TLS client: its SNI is the broker's name, checked against the broker's certificate
    raw_mqtt(proxy.ports[0], pki.client_context("tenant-a.example"), "tls-to-tls").close()
    tls_broker.wait_for_client("tls-to-tls")
    mark = proxy.mark()
    sock = tls_dial(proxy.ports[0], pki.client_context("eu.tenant-b.example"))
    sock.sendall(packets.connect_v311(b"wrong-name"))
    assert sock.recv(10) == b""
    sock.close()
    line = proxy.wait_for_log("while SSL handshaking to upstream", since=mark)
    assert "Hostname mismatch" in line or "certificate verify failed" in line
    assert "wrong-name" not in tls_broker.client_ids()


@pytest.mark.parametrize("how", ["inline", "client_cert_id"])
def test_client_certificate_to_a_broker_that_requires_one(gproxy, tmp_path, pki, how):
    broker = Broker(str(tmp_path), "mtls-broker")
    with open(broker.conf_path, "a") as fh:
        fh.write("certfile %s\nkeyfile %s\ncafile %s\nrequire_certificate true\n" % (
            pki.path("broker.crt"), pki.path("broker.key"), pki.ca_file))
    broker.start()
    try:
        device = pki.device
        cert = device.cert_chain_pems[0].bytes().decode()
        key = device.private_key_pem.bytes().decode()
        tls = {"client_cert": cert, "client_key": key} if how == "inline" else \
            {"client_cert_id": "dev"}
        upstream = {"type": "roundrobin", "scheme": "tls", "tls": tls, "nodes": [node(broker)]}
        route = {"id": 1, "plugins": {"mqtt-proxy": {"protocol_level": 4}},
                 "upstream": upstream}
        proxy = gproxy([route])
        if how == "client_cert_id":
            status, body = admin(proxy, "PUT", "/ssls/dev", {"type": "client", "cert": cert,
                                                            "key": key})
            assert status == 201, body
        with Paho("with-client-cert", proxy.port):
            broker.wait_for_client("with-client-cert")
        mark = proxy.mark()
        proxy.rewrite_routes([dict(route, upstream=dict(upstream, tls={}))])
        proxy.wait_for_log("route table updated", timeout=10, since=mark)
        sock = socket.create_connection((HOST, proxy.port), timeout=WAIT)
        sock.sendall(packets.connect_v311(b"without-cert"))
        expect_closed(sock)  # the broker refused the handshake or closed
        sock.close()
        assert "without-cert" not in broker.client_ids()
    finally:
        broker.stop()


def test_tls_to_broker_verification_failure_is_logged(gproxy, tmp_path):
    other = trustme.CA()
    leaf = other.issue_cert("127.0.0.1")
    broker = Broker(str(tmp_path), "untrusted")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "u.crt"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "u.key"))
    with open(broker.conf_path, "a") as fh:
        fh.write("certfile %s\nkeyfile %s\n" % (tmp_path / "u.crt", tmp_path / "u.key"))
    broker.start()
    try:
        upstream = {"type": "roundrobin", "scheme": "tls", "tls": {"verify": True},
                    "nodes": [node(broker)]}
        proxy = gproxy([{"id": 1, "plugins": {"mqtt-proxy": {"protocol_level": 4}},
                         "upstream": upstream}])
        sock = socket.create_connection((HOST, proxy.port), timeout=WAIT)
        sock.sendall(packets.connect_v311(b"refused"))
        assert sock.recv(10) == b""
        sock.close()
        proxy.wait_for_log("certificate verify failed")
        proxy.wait_for_log("while SSL handshaking to upstream")
    finally:
        broker.stop()


# -- client certificates and the CONNECT rewrite ----------------------------------------

def test_client_certificate_cn_rewrites_the_client_id(gproxy, mosquitto, pki):
    broker = mosquitto()
    route = mqtt_route([node(broker)], type_="roundrobin")
    route["plugins"]["mqtt-proxy"]["set_connect"] = {"client_id": "$tls_client_cn"}
    proxy = gproxy([route], config=tls_listener())
    status, body = admin(proxy, "PUT", "/ssls/1", pki.ssl_object(
        1, ["tenant-a.example"], client={"ca": pki.ca.cert_pem.bytes().decode()}))
    assert status == 201, body
    with Paho("chosen-by-client", proxy.port, tls_context=pki.client_context(
            "tenant-a.example", device=True), username="u1") as client:
        broker.wait_for_client("device-7")
        client.subscribe("t")
        sessions = admin(proxy, "GET", "/gproxy/sessions")[1]["list"]
        assert [(s["client_id"], s["tls_client_cn"], s["username"], s["sni"])
                for s in sessions] == [("device-7", "device-7", "u1", "tenant-a.example")]
    assert "chosen-by-client" not in broker.client_ids()
    mark = proxy.mark()
    with pytest.raises((ssl.SSLError, OSError)):  # no client certificate: refused
        sock = tls_dial(proxy.port, pki.client_context("tenant-a.example"))
        sock.sendall(packets.connect_v311(b"anon"))
        if not sock.recv(10):
            raise OSError("closed")
    proxy.wait_for_log("SSL_do_handshake() failed", since=mark)


def test_rewrite_with_an_unset_variable_refuses_the_client(gproxy, mosquitto):
    broker = mosquitto()
    route = mqtt_route([node(broker)], type_="roundrobin")
    route["plugins"]["mqtt-proxy"]["set_connect"] = {"client_id": "$tls_client_cn"}
    proxy = gproxy([route])
    sock = socket.create_connection((HOST, proxy.port), timeout=WAIT)
    sock.sendall(packets.connect_v311(b"plain"))
    assert sock.recv(10) == b""
    sock.close()
    proxy.wait_for_log("failed to rewrite the CONNECT: variable tls_client_cn is not set")
    assert broker.connections() == []  # refused before any node was dialled


def test_a_stalled_handshake_holds_no_one_else(gproxy, mosquitto, pki):
    """A client that sends its ClientHello and then nothing must not stop the hub
    (OpenSSL waiting in poll(2) on a socket it thinks is blocking would)."""
    from tests import wire
    broker = mosquitto()
    proxy = gproxy([mqtt_route([node(broker)], type_="roundrobin")], config=tls_listener())
    admin(proxy, "PUT", "/ssls/1", pki.ssl_object(1, ["tenant-a.example"]))
    stalled = []
    for _ in range(3):
        sock = socket.create_connection((HOST, proxy.port), timeout=WAIT)
        sock.sendall(wire.openssl_client_hello("tenant-a.example"))
        stalled.append(sock)
    try:
        for i in range(3):
            raw_mqtt(proxy.port, pki.client_context("tenant-a.example"), "busy-%d" % i).close()
            broker.wait_for_client("busy-%d" % i)
    finally:
        for sock in stalled:
            sock.close()


# -- the Admin API over HTTPS ----------------------------------------------------------

def https_get(proxy, ctx, path="/apisix/admin/stream_routes"):
    conn = http.client.HTTPSConnection(HOST, proxy.admin_port, timeout=10, context=ctx)
    try:
        conn.request("GET", path, headers={"X-API-KEY": KEY})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("mtls", [False, True], ids=["https", "https+client-cert"])
def test_admin_over_https(gproxy, pki, mtls):
    admin_leaf = pki.ca.issue_cert("127.0.0.1")
    admin_leaf.cert_chain_pems[0].write_to_path(pki.path("admin.crt"))
    admin_leaf.private_key_pem.write_to_path(pki.path("admin.key"))
    mtls_conf = {"admin_ssl_cert": pki.path("admin.crt"),
                 "admin_ssl_cert_key": pki.path("admin.key")}
    if mtls:
        mtls_conf["admin_ssl_ca_cert"] = pki.ca_file
    proxy = gproxy([], config={"deployment": {"admin": {"https_admin": True,
                                                        "admin_api_mtls": mtls_conf}}})
    wait_listening(proxy.admin_port, proxy.proc, what="gproxy admin")
    ctx = ssl.create_default_context(cafile=pki.ca_file)
    if mtls:
        with pytest.raises((ssl.SSLError, OSError)):
            https_get(proxy, ctx)
        ctx.load_cert_chain(pki.path("device.pem"))
    status, body = https_get(proxy, ctx)
    assert status == 200 and json.loads(body) == {"list": [], "total": 0}
    status, page = https_get(proxy, ctx, "/ui/")
    assert status == 200 and b"<html" in page.lower()
    plain = http.client.HTTPConnection(HOST, proxy.admin_port, timeout=5)
    with pytest.raises((http.client.HTTPException, OSError)):
        plain.request("GET", "/apisix/admin/stream_routes", headers={"X-API-KEY": KEY})
        plain.getresponse().read()
    plain.close()
    assert "admin API listening on https://" in proxy.log()


def https_admin(gproxy, pki, **admin):
    """A gproxy whose Admin API is served over HTTPS (``admin``: gproxy.admin.*)."""
    leaf = pki.ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(pki.path("admin.crt"))
    leaf.private_key_pem.write_to_path(pki.path("admin.key"))
    proxy = gproxy([], config={
        "deployment": {"admin": {"https_admin": True, "admin_api_mtls": {
            "admin_ssl_cert": pki.path("admin.crt"), "admin_ssl_cert_key": pki.path("admin.key")}}},
        "gproxy": {"admin": admin}})
    wait_listening(proxy.admin_port, proxy.proc, what="gproxy admin")
    return proxy


def test_stalled_tls_handshakes_do_not_deny_the_https_admin(gproxy, pki):
    """Idle TCP connections and handshakes stalled halfway (a ClientHello's
    first bytes, then nothing) on the HTTPS admin port: at the cap they give
    way, and the stalled ones end at the request timeout, without a line each."""
    proxy = https_admin(gproxy, pki, max_connections=8, request_timeout=1)
    idle = [socket.create_connection((HOST, proxy.admin_port), timeout=5) for _ in range(100)]
    stalled = []
    for _ in range(20):
        sock = socket.create_connection((HOST, proxy.admin_port), timeout=5)
        sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # a record header and a byte of hello
        stalled.append(sock)
    try:
        status, body = https_get(proxy, ssl.create_default_context(cafile=pki.ca_file))
        assert status == 200 and json.loads(body) == {"list": [], "total": 0}
        proxy.wait_for_log("admin reclaimed=")
        for sock in stalled[-4:]:
            assert sock.recv(10) == b"", "a stalled handshake outlived the request timeout"
    finally:
        for sock in idle + stalled:
            sock.close()
    assert "TLS handshake with" not in proxy.log()


def test_bytes_decrypted_during_preread_reach_the_broker(gproxy, sink, pki):
    """CONNECT and a PUBLISH in one TLS record: preread takes the CONNECT and
    OpenSSL keeps the rest decrypted; the relay must send it on without waiting
    for the client to send more."""
    proxy = gproxy([mqtt_route([node(sink)], type_="roundrobin")], config=tls_listener())
    admin(proxy, "PUT", "/ssls/1", pki.ssl_object(1, ["tenant-a.example"]))
    data = packets.connect_v311(b"one-record") + packets.publish("t", b"p" * 12000)
    tls = tls_dial(proxy.port, pki.client_context("tenant-a.example"))
    tls.sendall(data)
    conn = sink.wait_for_connection()
    packets.assert_packet(conn.wait_for_bytes(len(data)), data, "CONNECT + PUBLISH")
    tls.close()


def test_mqtt_over_websocket_over_tls(gproxy, mosquitto, pki):
    """wss: the WebSocket upgrade and frames come over the TLS listener, on one port."""
    broker = mosquitto()
    proxy = gproxy([mqtt_route([node(broker)], type_="roundrobin")], config=tls_listener())
    admin(proxy, "PUT", "/ssls/1", pki.ssl_object(1, ["tenant-a.example"]))
    ctx = pki.client_context("tenant-a.example")
    with Paho("wss-sub", proxy.port, transport="websockets", tls_context=ctx) as sub, \
            Paho("tls-pub", proxy.port, tls_context=ctx) as pub:
        sub.subscribe("wss/t", qos=1)
        pub.publish("wss/t", b"w" * 40000, qos=1)
        assert sub.expect_message().payload == b"w" * 40000
        sessions = admin(proxy, "GET", "/gproxy/sessions")[1]["list"]
        assert sorted((s["client_id"], s["transport"]) for s in sessions) == [
            ("tls-pub", "tcp"), ("wss-sub", "wss")]
        assert admin(proxy, "GET", "/gproxy/stats")[1]["per_transport"] == {"tcp": 1, "wss": 1}
    broker.wait_for_client("wss-sub")
