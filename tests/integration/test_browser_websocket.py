"""A browser page using MQTT.js reaches mosquitto through gproxy's MQTT port.

Debian's chromium (headless, driven by Playwright) opens a test page served
from loopback (tests/integration/web/, MQTT.js vendored there: nothing comes
from a CDN).  The page connects over WebSocket through gproxy, whose chash
route spreads client ids over two brokers exactly as APISIX's ring (an
independent model) says; paho clients on the brokers themselves exchange
messages with the page both ways.  The route's Origin option lets the page's
origin in and keeps another one out.
"""

import functools
import http.server
import json
import pathlib
import threading
import urllib.request

import pytest

from tests.integration.browser import browser, new_page, require_browser  # noqa: F401 (a fixture)
from tests.integration.conftest import HOST, MOSQUITTO, mqtt_route, node, wait_until
from tests.integration.helpers import ApisixRing, Paho
from tests.needs import require

sync_api = require_browser("the MQTT.js browser tests")

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(90)]

WEB = pathlib.Path(__file__).resolve().parent / "web"
ADMIN_KEY = "edd1c9f034335f136f87ad84b625c8f1"
WAIT_MS = 8000


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web():
    """The test page over HTTP on loopback; yields its origin."""
    server = http.server.ThreadingHTTPServer(
        (HOST, 0), functools.partial(_Quiet, directory=str(WEB)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "http://%s:%d" % (HOST, server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def setup(module_mosquitto, module_gproxy, web):
    require(MOSQUITTO is not None, "needs mosquitto (apt-get install mosquitto)")
    a, b = module_mosquitto("a"), module_mosquitto("b")
    ws = {"path": "/mqtt", "allow_origins": [web]}

    def routes(ports):
        r4 = mqtt_route([node(a), node(b)], route_id="browser", server_port=ports[0])
        r5 = mqtt_route([node(a)], route_id="browser-v5", level=5, server_port=ports[1])
        for r in (r4, r5):
            r["plugins"]["mqtt-proxy"]["websocket"] = ws
        return [r4, r5]

    gp = module_gproxy(routes, listeners=2)
    return gp, a, b


@pytest.fixture
def open_page(browser):
    contexts = []

    def open_(origin, port, client_id, topic, version=4):
        page = new_page(browser, WAIT_MS)
        contexts.append(page.context)
        page.goto("%s/mqttjs.html?url=ws://%s:%d/mqtt&id=%s&sub=%s&v=%d" % (
            origin, HOST, port, client_id, topic, version))
        return page

    yield open_
    for context in contexts:
        context.close()


def events(page, kind):
    return [e["detail"] for e in page.evaluate("window.events") if e["kind"] == kind]


def wait_event(page, kind, timeout=8.0):
    found = wait_until(lambda: events(page, kind), timeout)
    assert found, "no %r event; page saw %s" % (kind, page.evaluate("window.events"))
    return found


def sessions(gp):
    req = urllib.request.Request("http://%s:%d/apisix/admin/gproxy/sessions" % (
        HOST, gp.admin_port), headers={"X-API-KEY": ADMIN_KEY})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())["list"]


def session_of(gp, client_id):
    found = wait_until(lambda: [s for s in sessions(gp) if s["client_id"] == client_id], 5)
    assert found, "gproxy lists no session for %r" % client_id
    return found[0]


def test_mqttjs_page_reaches_the_broker_its_client_id_hashes_to(setup, web, open_page):
    gp, a, b = setup
    ring = ApisixRing([(a.host, a.port, 1), (b.host, b.port, 1)])
    by_addr = {a.addr: a, b.addr: b}
    ids = ["browser-%d" % i for i in range(20)]
    picks = {}
    for cid in ids:  # one id for each broker
        picks.setdefault(ring.pick(cid), cid)
    assert len(picks) == 2
    for addr, client_id in sorted(picks.items()):
        broker = by_addr[addr]
        page = open_page(web, gp.ports[0], client_id, "to-page/%s" % client_id)
        wait_event(page, "subscribed")
        session = session_of(gp, client_id)
        assert (session["node"], session["transport"], session["protocol_level"]) == (
            addr, "ws", 4)
        broker.wait_for_client(client_id)
        with Paho("watch-%s" % client_id, broker.port) as watcher:  # on the broker itself
            watcher.subscribe("from-page/#", 1)
            assert page.evaluate("publish('from-page/%s', 'hello from MQTT.js')" % client_id) == "ok"
            msg = watcher.expect_message()
            assert (msg.topic, msg.payload) == ("from-page/%s" % client_id, b"hello from MQTT.js")
            assert page.evaluate("publish('from-page/big', 'x', 300000)") == "ok"
            assert len(watcher.expect_message().payload) == 300000  # several frames
            watcher.publish("to-page/%s" % client_id, b"hello browser " * 20000, 1)
            got = wait_event(page, "message")[0]
            assert (got["topic"], got["length"]) == ("to-page/%s" % client_id, 280000)
        assert page.js_errors == []


def test_mqttjs_v5(setup, web, open_page):
    gp, a, _ = setup
    page = open_page(web, gp.ports[1], "browser-v5", "v5/in", version=5)
    wait_event(page, "subscribed")
    assert session_of(gp, "browser-v5")["protocol_level"] == 5
    with Paho("watch-v5", a.port) as watcher:
        watcher.publish("v5/in", b"five", 1)
        assert wait_event(page, "message")[0]["text"] == "five"
    assert "(p5, c1" in a.log.wait_for("as browser-v5 ")


def test_another_origin_is_refused(setup, web, open_page):
    gp, a, _ = setup
    mark = gp.mark()
    other = web.replace(HOST, "localhost")  # the same page from another origin
    page = open_page(other, gp.ports[0], "browser-elsewhere", "x")
    wait_event(page, "close")
    assert not events(page, "connect")
    gp.wait_for_log("websocket handshake refused: 403 Forbidden: origin %s not allowed" % other,
                    since=mark)
    assert "browser-elsewhere" not in a.client_ids()
