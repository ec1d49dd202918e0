"""A production-like etcd: authentication, client TLS, and private keys encrypted at rest.

One etcd (Debian's) for the module, serving clients over TLS only with a
certificate for ``etcd.test`` (not the address dialled, so gproxy needs
APISIX's ``tls.sni``), requiring client certificates, and with etcd's
authentication on (a user that may use one prefix).  Certificates are made
at test time with trustme.  gproxy runs as the ``gproxy`` command.

The ``ssls`` objects with encrypted keys are written by the test itself with
APISIX's algorithm and default keyring (``tests/apisix_keyring``, not
gproxy's code), and the keys gproxy writes are decrypted the same way.
"""

import json
import re
import socket
import ssl
import subprocess
import sys

import pytest
import trustme  # noqa: E402  (the test extra: a missing one must fail, not skip)

from tests import apisix_keyring, packets
from tests.integration.conftest import (HOST, Gproxy, mqtt_route, node, wait_listening,
                                        wait_until)
from tests.integration.etcd import Etcd, needs_etcd
from tests.integration.helpers import CONNACK_OK, WAIT, Paho, http_call, recv_exact

pytestmark = [pytest.mark.integration, needs_etcd]
KEY = "edd1c9f034335f136f87ad84b625c8f1"
PREFIX = "/secure"
USER, PASSWORD = "gproxy-user", "s3cret-pw-never-logged"


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    server = Etcd(str(tmp_path_factory.mktemp("etcd")), ca=trustme.CA(),
                  names=["etcd.test"]).start()
    server.enable_auth(USER, PASSWORD, PREFIX)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tenant(tmp_path_factory):
    """A CA and a server certificate for tenant.example (for the TLS listener)."""
    ca = trustme.CA()
    leaf = ca.issue_cert("tenant.example")
    path = str(tmp_path_factory.mktemp("tenant") / "ca.pem")
    ca.cert_pem.write_to_path(path)
    return {"cert": leaf.cert_chain_pems[0].bytes().decode(),
            "key": leaf.private_key_pem.bytes().decode(), "ca_file": path}


@pytest.fixture
def prefix(request):
    """Each test's own key prefix, inside the one the etcd user may use."""
    return PREFIX + "/" + re.sub(r"\W", "-", request.node.name)


def secure_config(etcd, prefix, **changes):
    """config.yaml for ``etcd``: APISIX's keys, with ``changes`` to the etcd section."""
    section = {"host": [etcd.url], "prefix": prefix, "timeout": 5, "user": USER,
               "password": PASSWORD,
               "tls": {"cert": etcd.client_cert, "key": etcd.client_key, "sni": "etcd.test"}}
    section.update(changes)
    return {"deployment": {"role": "traditional", "role_traditional": {"config_provider": "etcd"},
                           "etcd": section},
            "apisix": {"ssl": {"ssl_trusted_certificate": etcd.ca_file}}}


def admin(proxy, method, path, body=None):
    status, raw = http_call(proxy.admin_port, method, "/apisix/admin" + path,
                            None if body is None else json.dumps(body), {"X-API-KEY": KEY}, 15)
    return status, json.loads(raw or b"{}")


def started(gproxy, config, routes=()):
    proxy = gproxy(list(routes), config=config)
    wait_listening(proxy.admin_port, proxy.proc, what="gproxy admin")
    return proxy


def refused_start(tmp_path, config):
    """Run gproxy with ``config``; it must exit (status, stderr)."""
    proxy = Gproxy(str(tmp_path / "refused"), [], config=config)
    out = subprocess.run([sys.executable, "-m", "gproxy", "-c", proxy.config_path],
                         cwd=proxy.dir, capture_output=True, text=True, timeout=60)
    return out.returncode, out.stderr


def served(proxy, client_id, broker):
    with Paho(client_id, proxy.port):
        broker.wait_for_client(client_id)
    return True


# -- auth and TLS ----------------------------------------------------------------------

def test_routes_through_an_etcd_with_auth_and_client_tls(etcd, gproxy, mosquitto, prefix):
    broker = mosquitto()
    a = started(gproxy, secure_config(etcd, prefix))
    b = started(gproxy, secure_config(etcd, prefix))
    route = mqtt_route([node(broker)])
    route.pop("id")
    status, body = admin(a, "PUT", "/stream_routes/1", route)
    assert status == 201, body
    stored = json.loads(etcd.ctl("get", prefix + "/stream_routes/1", "--print-value-only"))
    assert stored == body["value"]
    assert served(a, "via-a", broker)
    assert wait_until(lambda: admin(b, "GET", "/stream_routes/1")[0] == 200, WAIT)
    assert served(b, "via-b", broker)
    # a route written by another client (etcdctl, as root) reaches both through the watch
    route["upstream"]["type"] = "roundrobin"
    route["upstream"].pop("key")
    etcd.ctl("put", prefix + "/stream_routes/2", json.dumps(dict(route, server_port=b.port)))
    assert wait_until(lambda: admin(a, "GET", "/stream_routes/2")[0] == 200, WAIT)
    # the fleet's keys live under the same prefix and the same credentials
    assert wait_until(lambda: admin(a, "GET", "/gproxy/instances")[1]["total"] == 2, WAIT)
    for proxy in (a, b):
        assert PASSWORD not in proxy.log()


def test_wrong_credentials_are_refused_with_apisix_error(etcd, tmp_path, prefix):
    status, err = refused_start(tmp_path, secure_config(etcd, prefix,
                                                        password="not-the-password"))
    assert status == 2, err
    url = "%s/v3/auth/authenticate" % etcd.url
    # apisix/cli/etcd.lua: got malformed auth message: "<etcd's answer>" from etcd "<url>"
    found = re.search(r'got malformed auth message: "(\{.*\})" from etcd "%s"' % re.escape(url),
                      err)
    assert found, err
    assert json.loads(found.group(1))["error"] == (
        "etcdserver: authentication failed, invalid user ID or password")
    assert "not-the-password" not in err


def test_tls_settings_mean_what_they_mean_in_apisix(etcd, gproxy, tmp_path, prefix):
    # without tls.sni the certificate (for etcd.test) does not name the address dialled
    tls = {"cert": etcd.client_cert, "key": etcd.client_key}
    status, err = refused_start(tmp_path, secure_config(etcd, prefix, tls=tls))
    assert status == 2 and "%s: certificate verify failed" % etcd.url in err, err
    # verify: false takes it anyway (no CA, no name check)
    config = secure_config(etcd, prefix, tls=dict(tls, verify=False))
    config["apisix"]["ssl"]["ssl_trusted_certificate"] = "system"
    proxy = started(gproxy, config)
    assert admin(proxy, "GET", "/stream_routes")[0] == 200
    # no client certificate: etcd ends the handshake
    status, err = refused_start(tmp_path, secure_config(etcd, prefix, tls={"sni": "etcd.test"}))
    assert status == 2 and "%s: handshake failed" % etcd.url in err, err


# -- private keys at rest -----------------------------------------------------------------

def tls_listener(ports):
    return {"apisix": {"stream_proxy": {"tcp": [{"addr": "%s:%d" % (HOST, p), "tls": True}
                                                for p in ports]}}}


def with_tls_listener(config):
    def make(ports):
        merged = tls_listener(ports)
        merged["deployment"] = config["deployment"]
        merged["apisix"].update(config["apisix"])
        return merged
    return make


def mqtt_over_tls(port, ca_file, client_id):
    ctx = ssl.create_default_context(cafile=ca_file)
    sock = socket.create_connection((HOST, port), timeout=WAIT)
    try:
        tls = ctx.wrap_socket(sock, server_hostname="tenant.example")
        tls.sendall(packets.connect_v311(client_id))
        packets.assert_packet(recv_exact(tls, 4), CONNACK_OK, "CONNACK")
        return tls.version()
    finally:
        sock.close()


def test_an_ssl_object_encrypted_by_apisix_serves_a_handshake(etcd, gproxy, mosquitto, tenant,
                                                             prefix):
    broker = mosquitto()
    stored_key = apisix_keyring.encrypt(apisix_keyring.DEFAULT_KEYRING[0], tenant["key"])
    assert not stored_key.startswith("-")
    etcd.ctl("put", prefix + "/ssls/apisix-written", json.dumps(
        {"snis": ["tenant.example"], "cert": tenant["cert"], "key": stored_key}))
    route = mqtt_route([node(broker)], route_id="tls-route", type_="roundrobin")
    etcd.ctl("put", prefix + "/stream_routes/tls-route", json.dumps(route))
    proxy = gproxy([], config=with_tls_listener(secure_config(etcd, prefix)))
    wait_listening(proxy.admin_port, proxy.proc, what="gproxy admin")
    assert wait_until(lambda: admin(proxy, "GET", "/ssls/apisix-written")[0] == 200, WAIT)
    assert mqtt_over_tls(proxy.port, tenant["ca_file"], "tls-client")
    broker.wait_for_client("tls-client")
    # another keyring cannot read it: APISIX's words in the log, and no key in them
    other = secure_config(etcd, prefix)
    other["apisix"]["data_encryption"] = {"keyring": ["0123456789abcdef"]}
    wrong = gproxy([], config=with_tls_listener(other))
    wrong.wait_for_log("failed to check item data of [%s/ssls] err:failed to decrypt "
                       "previous encrypted key" % prefix, WAIT)
    assert stored_key not in wrong.log() and "PRIVATE KEY" not in wrong.log()
    with pytest.raises((ssl.SSLError, OSError)):
        mqtt_over_tls(wrong.port, tenant["ca_file"], "refused")


def test_a_key_written_through_gproxy_is_stored_as_apisix_stores_it(etcd, gproxy, tenant,
                                                                  prefix):
    proxy = started(gproxy, secure_config(etcd, prefix))
    conf = {"snis": ["tenant.example"], "cert": tenant["cert"], "key": tenant["key"]}
    status, body = admin(proxy, "PUT", "/ssls/by-gproxy", conf)
    assert status == 201 and "key" not in body["value"], body
    stored = json.loads(etcd.ctl("get", prefix + "/ssls/by-gproxy", "--print-value-only"))
    assert not stored["key"].startswith("-----BEGIN")
    assert apisix_keyring.decrypt(apisix_keyring.DEFAULT_KEYRING[0], stored["key"]) == \
        tenant["key"]
    assert "key" not in admin(proxy, "GET", "/ssls/by-gproxy")[1]["value"]
    # a key given already encrypted is checked decrypted, and served
    conf2 = dict(conf, key=apisix_keyring.encrypt(apisix_keyring.DEFAULT_KEYRING[1],
                                                  tenant["key"]))
    assert admin(proxy, "PUT", "/ssls/given-encrypted", conf2)[0] == 201
    bad = dict(conf, key=apisix_keyring.encrypt("0123456789abcdef", tenant["key"]))
    status, body = admin(proxy, "PUT", "/ssls/wrong-key", bad)
    assert (status, body) == (400, {"error_msg": "failed to decrypt previous encrypted key"})
    # keyring: null stores keys as given
    plain = secure_config(etcd, prefix)
    plain["apisix"]["data_encryption"] = {"keyring": None}
    other = started(gproxy, plain)
    assert admin(other, "PUT", "/ssls/as-given", conf)[0] == 201
    stored = json.loads(etcd.ctl("get", prefix + "/ssls/as-given", "--print-value-only"))
    assert stored["key"] == tenant["key"]
    for proxy_ in (proxy, other):
        assert "PRIVATE KEY" not in proxy_.log()
