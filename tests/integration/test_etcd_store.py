"""The etcd store against a real etcd: shared routes, APISIX's layout, outages.

etcd (Debian's ``etcd-server``) runs once per module on free loopback ports
with a temp data dir; each test uses its own key prefix, except the one that
writes ``/apisix/stream_routes/9`` with ``etcdctl`` as the issue asks.  gproxy
runs as the ``gproxy`` command (monkey-patched), and once embedded (not).
"""

import json
import re

import pytest

from tests.integration.conftest import HOST, mqtt_route, node, wait_listening, wait_until
from tests.integration.etcd import etcd, needs_etcd, prefix  # noqa: F401 (fixtures)
from tests.integration.helpers import ApisixRing, Paho, http_call

pytestmark = [pytest.mark.integration, needs_etcd]
KEY = "edd1c9f034335f136f87ad84b625c8f1"
WAIT = 10.0  # seconds for a change to reach another instance through etcd


def on_etcd(gproxy, etcd, prefix):
    """A gproxy on ``etcd`` under ``prefix``, once its Admin API listens too."""
    proxy = gproxy([], config=etcd.etcd_config(prefix))
    wait_listening(proxy.admin_port, proxy.proc, what="gproxy admin")
    return proxy


def admin(port, method, path, body=None, timeout=15.0):
    """One Admin API request: ``(status, json)``."""
    status, raw = http_call(port, method, "/apisix/admin" + path,
                            None if body is None else json.dumps(body), {"X-API-KEY": KEY}, timeout)
    return status, json.loads(raw or b"{}")


def served(proxy, client_id, broker):
    """A paho client through ``proxy`` gets a CONNACK, and ``broker`` saw it."""
    with Paho(client_id, proxy.port):
        broker.wait_for_client(client_id)
    return True


def try_connect(port, client_id):
    try:
        with Paho(client_id, port):
            return True
    except (AssertionError, OSError):
        return False


def test_two_instances_share_routes_and_agree_on_the_broker(etcd, gproxy, mosquitto, prefix):
    brokers = [mosquitto("b0"), mosquitto("b1")]
    a = on_etcd(gproxy, etcd, prefix)
    b = on_etcd(gproxy, etcd, prefix)
    route = mqtt_route([node(x) for x in brokers])
    route.pop("id")
    status, body = admin(a.admin_port, "PUT", "/stream_routes/1", route)
    assert status == 201, body
    assert body["key"] == prefix + "/stream_routes/1"
    # stored under APISIX's key, in APISIX's JSON, with etcd's revisions as indexes
    kv = etcd.get(prefix + "/stream_routes/1")
    assert kv["value"] == body["value"]
    # B learns it through its watch and serves it
    assert wait_until(lambda: admin(b.admin_port, "GET", "/stream_routes/1")[0] == 200, WAIT)
    status, got = admin(b.admin_port, "GET", "/stream_routes/1")
    assert (got["createdIndex"], got["modifiedIndex"]) == (
        int(kv["create_revision"]), int(kv["mod_revision"]))
    # the same client id lands on the same broker through either instance (chash)
    ring = ApisixRing([(x.host, x.port, 1) for x in brokers])
    for client_id in ("sensor-1", "sensor-2", "sensor-3"):
        want = next(x for x in brokers if x.addr == ring.pick(client_id))
        for proxy, tag in ((a, "a"), (b, "b")):
            mark = want.log.mark()
            with Paho(client_id, proxy.port):
                want.wait_for_client(client_id, since=mark)
            assert tag in "ab"
    # a write through B (an upstream and a route using it by id) reaches A
    status, _ = admin(b.admin_port, "PUT", "/upstreams/u1",
                      {"type": "roundrobin", "nodes": [node(brokers[1])]})
    assert status == 201
    status, _ = admin(b.admin_port, "PUT", "/stream_routes/1",
                      {"upstream_id": "u1",
                       "plugins": {"mqtt-proxy": {"protocol_level": 4}}})
    assert status == 200
    assert wait_until(lambda: admin(a.admin_port, "GET", "/stream_routes/1")[1]
                      .get("value", {}).get("upstream_id") == "u1", WAIT)
    mark = brokers[1].log.mark()
    with Paho("via-u1", a.port):
        brokers[1].wait_for_client("via-u1", since=mark)
    # a delete through A stops B serving it
    assert admin(a.admin_port, "DELETE", "/stream_routes/1")[0] == 200
    assert wait_until(lambda: not try_connect(b.port, "after-delete"), WAIT)


def test_post_ids_and_indexes_come_from_etcd(etcd, gproxy, prefix):
    a = on_etcd(gproxy, etcd, prefix)
    status, body = admin(a.admin_port, "POST", "/upstreams",
                         {"type": "roundrobin", "nodes": {"127.0.0.1:1883": 1}})
    assert status == 201, body
    new_id = body["value"]["id"]
    assert re.fullmatch(r"\d{20}", new_id), new_id
    kv = etcd.get(prefix + "/upstreams/" + new_id)
    # APISIX: the id is the revision of the put to <prefix>/gen_id, zero-padded
    gen = etcd.get(prefix + "/gen_id")
    assert int(new_id) == int(gen["mod_revision"]) == int(kv["mod_revision"]) - 1
    status, listed = admin(a.admin_port, "GET", "/upstreams")
    assert [(i["createdIndex"], i["modifiedIndex"]) for i in listed["list"]] == [
        (int(kv["create_revision"]), int(kv["mod_revision"]))]


def test_a_route_put_with_etcdctl_is_served(etcd, gproxy, mosquitto):
    broker = mosquitto()
    a = on_etcd(gproxy, etcd, "/apisix")
    route = {"plugins": {"mqtt-proxy": {"protocol_name": "MQTT", "protocol_level": 4}},
             "upstream": {"type": "chash", "key": "mqtt_client_id",
                          "nodes": [{"host": HOST, "port": broker.port, "weight": 1}]}}
    try:
        etcd.ctl("put", "/apisix/stream_routes/9", json.dumps(route))
        assert wait_until(lambda: try_connect(a.port, "from-etcdctl"), WAIT)
        broker.wait_for_client("from-etcdctl")
        status, got = admin(a.admin_port, "GET", "/stream_routes/9")
        assert got["value"]["id"] == "9"  # APISIX: the key names the object
        # an invalid value is logged in APISIX's words and the last valid one kept
        etcd.ctl("put", "/apisix/stream_routes/9", json.dumps({"upstream": {"type": "x"}}))
        a.wait_for_log("failed to check item data of [/apisix/stream_routes]", WAIT)
        assert try_connect(a.port, "still-served")
    finally:
        etcd.ctl("del", "/apisix/stream_routes/9")


def test_etcd_outage_keeps_routes_serving_and_admin_writes_fail_then_recover(
        etcd, gproxy, mosquitto, prefix):
    broker = mosquitto()
    a = on_etcd(gproxy, etcd, prefix)
    route = mqtt_route([node(broker)])
    route.pop("id")
    assert admin(a.admin_port, "PUT", "/stream_routes/1", route)[0] == 201
    with Paho("sub-live", a.port) as sub, Paho("pub-live", a.port) as pub:
        sub.subscribe("live", qos=1)
        mark = a.mark()
        etcd.stop()
        a.wait_for_log("etcd watch failed", WAIT, since=mark)
        # live sessions keep relaying
        pub.publish("live", b"during outage", qos=1)
        assert sub.expect_message().payload == b"during outage"
        # the last known routes keep serving new connections
        assert try_connect(a.port, "new-during-outage")
        # Admin writes fail with APISIX's 503 and etcd client error; reads still answer
        # (the watch's retries count as failures too, as in APISIX, so the endpoint
        # may already be marked unhealthy by the first write)
        refused = {"error_msg": "%s: connection refused" % etcd.url}
        unhealthy = {"error_msg": "has no healthy etcd endpoint available"}
        status, body = admin(a.admin_port, "PUT", "/stream_routes/2", route)
        assert status == 503 and body in (refused, unhealthy), body
        for _ in range(3):  # lua-resty-etcd: after 3 failures the endpoint is skipped
            status, body = admin(a.admin_port, "POST", "/upstreams",
                                 {"nodes": {"127.0.0.1:1": 1}})
        assert (status, body) == (503, unhealthy)
        assert admin(a.admin_port, "GET", "/stream_routes/1")[0] == 200
        assert admin(a.admin_port, "GET", "/stream_routes/2")[0] == 404
        # etcd returns: writes and the watch recover, sessions never noticed
        mark = a.mark()
        etcd.restart()
        etcd.ctl("put", prefix + "/stream_routes/3", json.dumps(route))
        a.wait_for_log("etcd watch resumed from revision", 30, since=mark)
        assert wait_until(lambda: admin(a.admin_port, "GET", "/stream_routes/3")[0] == 200,
                          WAIT)
        assert wait_until(lambda: admin(a.admin_port, "PUT", "/stream_routes/2", route)[0]
                          in (200, 201), 30, interval=0.5)
        pub.publish("live", b"after outage", qos=1)
        assert sub.expect_message().payload == b"after outage"


def test_gproxy_will_not_start_without_etcd(gproxy, tmp_path):
    from tests.integration.conftest import Gproxy, free_port
    down = "http://%s:%d" % (HOST, free_port())
    proxy = Gproxy(str(tmp_path / "g"), [], config={"deployment": {
        "role": "traditional", "role_traditional": {"config_provider": "etcd"},
        "etcd": {"host": [down]}}})
    with pytest.raises(RuntimeError, match="exited with status 2"):
        proxy.start()
    assert "cannot load the store: %s: connection refused" % down in proxy.log()


def _wait_on_hub(predicate, timeout=WAIT):
    """Like wait_until, sleeping cooperatively so this thread's hub runs the store."""
    import time
    import gevent
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        gevent.sleep(0.05)
    return False


def _route_json(port=1883):
    return json.dumps({"upstream": {"type": "roundrobin", "nodes": {"127.0.0.1:%d" % port: 1}}})


def test_a_broken_watch_resumes_after_its_revision_or_reloads_if_compacted(etcd, prefix,
                                                                          caplog):
    """White-box: stop the store's watch, write behind its back, start it again."""
    import logging
    from gproxy.store.etcd import EtcdStore
    caplog.set_level(logging.INFO, logger="gproxy.store")
    etcd.ctl("put", prefix + "/stream_routes/1", _route_json())
    store = EtcdStore([etcd.url], prefix, timeout=5)
    changes = []
    store.subscribe(lambda got: changes.append({(k, i) for k, i, _ in got if i is not None}))
    try:
        assert [r.id for r in store.list("stream_routes")] == ["1"]
        store.poll()  # starts the watch
        etcd.ctl("put", prefix + "/stream_routes/2", _route_json())
        assert _wait_on_hub(lambda: store.get("stream_routes", "2") is not None)
        # the watch breaks; two changes happen; it resumes from its last revision
        store.close()
        etcd.ctl("del", prefix + "/stream_routes/1")
        etcd.ctl("put", prefix + "/upstreams/u", json.dumps({"nodes": {"127.0.0.1:1": 1}}))
        store._watch._stop.clear()
        store.poll()
        assert _wait_on_hub(lambda: store.get("upstreams", "u") is not None
                            and store.get("stream_routes", "1") is None)
        assert "compacted" not in caplog.text
        # again, but etcd compacts the revisions it missed: a full reload instead
        store.close()
        etcd.ctl("put", prefix + "/stream_routes/3", _route_json())
        etcd.ctl("put", prefix + "/stream_routes/2", _route_json(1884))
        revision = json.loads(etcd.ctl("get", prefix + "/stream_routes/3", "-w", "json"))[
            "header"]["revision"]  # the watch would resume before it: compacted
        etcd.ctl("compact", str(revision))
        store._watch._stop.clear()
        store.poll()
        assert _wait_on_hub(lambda: store.get("stream_routes", "3") is not None)
        assert sorted(r.id for r in store.list("stream_routes")) == ["2", "3"]
        assert "etcd compacted revision %d; reloading" % revision in caplog.text
        # subscribers heard what the reload changed (3 is new, 2 has another node), not all
        assert changes[-1] == {("stream_routes", "3"), ("stream_routes", "2")}
    finally:
        store.close()


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_embedded_gproxy_on_etcd_leaves_nothing_behind(etcd, prefix, mode):
    import gc
    import os
    import threading
    import gproxy
    from tests.integration.conftest import free_port
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    conf = dict(etcd.etcd_config(prefix),
                apisix={"stream_proxy": {"tcp": ["%s:%d" % (HOST, free_port())]}})
    conf["deployment"]["admin"] = False
    with gproxy.start(conf, mode=mode) as proxy:
        body = proxy.routes.put("7", json.loads(_route_json()))
        assert etcd.get(prefix + "/stream_routes/7")["value"] == body["value"]
        etcd.ctl("put", prefix + "/stream_routes/8", _route_json())
        assert wait_until(lambda: proxy.routes.list()["total"] == 2, WAIT)
        # the watch runs where the proxy runs: a thread here, or the child process
        watching = any(t.name == "gproxy-etcd-watch" for t in threading.enumerate())
        assert watching is (mode == "thread")
    gc.collect()
    assert not [t for t in threading.enumerate() if t.name.startswith("gproxy-")]
    assert len(os.listdir("/proc/self/fd")) == fds


def test_an_ssl_object_written_through_one_instance_reaches_the_other(etcd, gproxy, prefix):
    """``ssls`` live in etcd beside the routes (``<prefix>/ssls/<id>``) and are watched."""
    import trustme
    leaf = trustme.CA().issue_cert("tenant.example")
    a = on_etcd(gproxy, etcd, prefix)
    b = on_etcd(gproxy, etcd, prefix)
    conf = {"snis": ["tenant.example"], "cert": leaf.cert_chain_pems[0].bytes().decode(),
            "key": leaf.private_key_pem.bytes().decode()}
    status, body = admin(a.admin_port, "PUT", "/ssls/1", conf)
    assert status == 201 and "key" not in body["value"], body
    assert etcd.get(prefix + "/ssls/1")["value"]["snis"] == ["tenant.example"]
    assert wait_until(lambda: admin(b.admin_port, "GET", "/ssls/1")[0] == 200, WAIT)
    assert "key" not in admin(b.admin_port, "GET", "/ssls/1")[1]["value"]
    assert admin(b.admin_port, "DELETE", "/ssls/1")[0] == 200
    assert wait_until(lambda: admin(a.admin_port, "GET", "/ssls/1")[0] == 404, WAIT)


def test_raw_etcd_keys_and_values_cannot_forge_a_log_line(etcd, gproxy, prefix):
    """Whoever can write the shared etcd chooses keys and values; gproxy logs a
    bad one in APISIX's words, escaped into one line."""
    a = on_etcd(gproxy, etcd, prefix)
    forged = "\n2026-01-01 00:00:00 [warn] 1#0: forged"  # (no "/": keys are split on it)
    mark = a.mark()
    etcd.ctl("put", prefix + "/stream_routes/7" + forged, "not json" + forged)
    try:
        line = a.wait_for_log("invalid item data of [%s/stream_routes/7\\x0a2026-01-01"
                              % prefix, WAIT, since=mark)
        assert "val: not json\\x0a2026-01-01 00:00:00 [warn] 1#0: forged" in line
        assert not [ln for ln in a.log(mark).splitlines() if ln.startswith("2026-01-01")]
    finally:
        etcd.ctl("del", "--prefix", prefix)
