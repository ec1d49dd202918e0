"""The dashboard (``admin_ui``) in a real browser against a real gproxy.

Debian's chromium, driven by Playwright's sync API, signs in, builds a chash
route through the forms, watches paho clients appear in the live connections
table on the node gproxy's own log names, disconnects them from the page and
deletes the route, while the Admin API and the clients confirm each step.

The tests run in file order and share one gproxy, two mosquitto brokers and
one browser page: each continues where the previous one left off.
Screenshots for docs/ are written only when ``GPROXY_SCREENSHOTS=1``.
"""

import collections
import json
import os
import pathlib
import re
import urllib.error
import urllib.request

import pytest

from tests import needs, packets
from tests.needs import require
from tests.integration.browser import browser, new_page, require_browser  # noqa: F401 (a fixture)
from tests.integration.conftest import HOST, MOSQUITTO, wait_listening
from tests.integration.helpers import ApisixRing, Paho, dial, expect_closed

sync_api = require_browser("the dashboard tests")
needs.module("paho.mqtt.client", "bash scripts/venv.sh test")
expect = sync_api.expect

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(90)]

KEY = "dashboard-test-key-0123456789abcdef"
ROUTE = "mqtt-brokers"
WAIT_MS = 5000
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"
PROXY_TO = re.compile(r"proxy request to (\S+) while connecting to upstream, client: ")


# -- fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def brokers(module_mosquitto):
    require(MOSQUITTO is not None, "the dashboard tests need mosquitto (apt-get install mosquitto)")
    return module_mosquitto("a"), module_mosquitto("b")


@pytest.fixture(scope="module")
def gp(brokers, module_gproxy):
    """gproxy with no routes yet and our own admin key; the dashboard adds the route."""
    proxy = module_gproxy([], config={"deployment": {"admin": {"admin_key": [
        {"name": "admin", "key": KEY, "role": "admin"}]}}})
    wait_listening(proxy.admin_port, proxy.proc, timeout=10, what="gproxy admin")
    proxy.base = "http://%s:%d" % (HOST, proxy.admin_port)
    return proxy


@pytest.fixture(scope="module")
def page(browser, gp):
    pg = new_page(browser, WAIT_MS, viewport={"width": 1280, "height": 800},
                  device_scale_factor=1, locale="en-US")
    yield pg
    pg.context.close()


@pytest.fixture(scope="module")
def clients():
    """Paho clients opened by the tests; all closed when the module ends."""
    opened = {}
    yield opened
    for client in opened.values():
        client.close()


# -- helpers ---------------------------------------------------------------------------

def admin(gp, method, path, body=None):
    """(status, JSON body) of an Admin API call made with our key."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(gp.base + "/apisix/admin" + path, data=data, method=method,
                                 headers={"X-API-KEY": KEY, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def screenshot(page, name, hide_toast=False):
    if os.environ.get("GPROXY_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        if hide_toast:
            page.evaluate("document.getElementById('toast').hidden = true")
        page.screenshot(path=str(DOCS / ("dashboard-%s.png" % name)))


def session_row(page, client_id):
    return page.locator("#sessions-table tbody tr[data-client-id='%s']" % client_id)


def two_ids_per_node(a, b):
    """Client ids the APISIX ring spreads two on each broker (so both bars show)."""
    ring = ApisixRing([(a.host, a.port, 1), (b.host, b.port, 1)])
    picked = collections.defaultdict(list)
    for i in range(200):
        cid = "sensor-%02d" % i
        node = ring.pick(cid)
        if len(picked[node]) < 2:
            picked[node].append(cid)
        if all(len(picked[n.addr]) == 2 for n in (a, b)):
            return sorted(picked[a.addr] + picked[b.addr])
    raise AssertionError("no id spread found")


def confirm_dialog(page, accept=True):
    dialog = page.locator("#confirm")
    expect(dialog).to_be_visible()
    dialog.locator("[data-role=%s]" % ("ok" if accept else "cancel")).click()
    expect(dialog).to_be_hidden()


# -- tests (in order) ------------------------------------------------------------------

def test_root_redirects_to_the_dashboard_which_loads_nothing_from_outside(gp):
    req = urllib.request.Request(gp.base + "/", method="GET")
    opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                              {"redirect_request": lambda *a, **k: None}))
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open(req, timeout=5)
    assert info.value.code == 302 and info.value.headers["Location"].endswith("/ui/")

    with urllib.request.urlopen(gp.base + "/ui/", timeout=5) as resp:
        html = resp.read().decode()
        assert "form-action 'none'" in resp.headers["Content-Security-Policy"]
    assets = re.findall(r'(?:href|src)="(/ui/static/[^"]+)"', html)
    assert {"/ui/static/app.js", "/ui/static/dashboard.css"} <= set(assets)
    for asset in assets:
        with urllib.request.urlopen(gp.base + asset, timeout=5) as resp:
            assert resp.status == 200
    static = pathlib.Path(__file__).resolve().parents[2] / "admin_ui"
    for path in static.rglob("*"):
        if path.suffix in (".js", ".css", ".html"):
            text = path.read_text()
            assert not re.search(r"https?://", text), "%s refers to another origin" % path
            assert not re.search(r"\.(inner|outer)HTML\b|insertAdjacentHTML|document\.write",
                                 text), "%s builds markup from strings" % path


def test_sign_in_refuses_a_wrong_key_then_accepts_the_right_one(page, gp):
    page.goto(gp.base + "/")
    expect(page.locator("#view-signin")).to_be_visible()
    expect(page.locator("#topbar")).to_be_hidden()
    screenshot(page, "signin")

    page.fill("#signin-key", "not-the-key")
    page.click("#signin-submit")
    error = page.locator("#signin-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("Wrong admin key")
    expect(error).to_contain_text("failed to check token (wrong apikey)")
    assert page.evaluate("sessionStorage.getItem('gproxy.adminKey')") is None

    page.fill("#signin-key", KEY)
    page.click("#signin-submit")
    expect(page.locator("#view-routes")).to_be_visible()
    expect(page.locator("#instance")).to_contain_text("gproxy")
    expect(page.locator("#instance")).to_contain_text("%s:%d" % (HOST, gp.admin_port))
    expect(page.locator("#routes-table + [data-role=empty]")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('gproxy.adminKey')") == KEY


def test_create_an_upstream_and_a_route_that_uses_it_by_id(page, gp, brokers):
    a, b = brokers
    page.click("a[data-tab=upstreams]")
    page.click("#new-upstream")
    form = page.locator("#upstream-form")
    expect(form).to_have_attribute("data-state", "ready")
    form.locator("input[name=id]").fill("broker-pool")
    form.locator("input[name=name]").fill("both brokers")
    form.locator("[data-u=type]").select_option("roundrobin")
    expect(form.locator("[data-u=key]")).to_be_hidden()
    for i, (broker, weight) in enumerate(((a, 2), (b, 1))):
        if i:
            form.locator("[data-role=add-node]").click()
        form.locator("[data-n=host]").nth(i).fill(broker.host)
        form.locator("[data-n=port]").nth(i).fill(str(broker.port))
        form.locator("[data-n=weight]").nth(i).fill(str(weight))
    form.locator("[data-role=save]").click()
    expect(page.locator("#upstreams-table tr[data-id=broker-pool]")).to_contain_text("roundrobin")
    value = admin(gp, "GET", "/upstreams/broker-pool")[1]["value"]
    assert {k: v for k, v in value.items() if not k.endswith("_time")} == {
        "id": "broker-pool", "name": "both brokers", "type": "roundrobin", "nodes": [
            {"host": a.host, "port": a.port, "weight": 2},
            {"host": b.host, "port": b.port, "weight": 1}]}

    # a route for MQTT 3.1 devices on another port, pointing at it by upstream_id
    page.click("a[data-tab=routes]")
    page.click("#new-route")
    form = page.locator("#route-form")
    expect(form).to_have_attribute("data-state", "ready")
    form.locator("input[name=id]").fill("legacy-31")
    form.locator("input[name=name]").fill("MQTT 3.1 devices")
    form.locator("input[name=server_port]").fill("1884")
    form.locator("input[name=protocol_name]").fill("MQIsdp")
    form.locator("select[name=protocol_level]").select_option("3")
    form.locator("input[name=upstream_mode][value=ref]").check()
    expect(form.locator("[data-u=type]")).to_be_hidden()
    form.locator("select[name=upstream_id]").select_option("broker-pool")
    form.locator("[data-role=save]").click()
    expect(page.locator("#routes-table tr[data-id=legacy-31]")).to_contain_text("MQTT 3.1")
    value = admin(gp, "GET", "/stream_routes/legacy-31")[1]["value"]
    assert value["upstream_id"] == "broker-pool" and "upstream" not in value
    assert value["server_port"] == 1884
    assert value["plugins"] == {"mqtt-proxy": {"protocol_name": "MQIsdp", "protocol_level": 3}}
    page.click("a[data-tab=upstreams]")
    expect(page.locator("#upstreams-table tr[data-id=broker-pool]")).to_contain_text("legacy-31")
    page.click("a[data-tab=routes]")


def test_create_a_chash_route_through_the_form(page, gp, brokers):
    a, b = brokers
    page.click("#new-route")
    form = page.locator("#route-form")
    expect(form).to_have_attribute("data-state", "ready")
    form.locator("input[name=id]").fill(ROUTE)
    form.locator("input[name=name]").fill("brokers")
    form.locator("input[name=desc]").fill("MQTT clients, sticky by client id")
    expect(form.locator("input[name=mqtt_enabled]")).to_be_checked()
    expect(form.locator("input[name=protocol_name]")).to_have_value("MQTT")
    form.locator("select[name=protocol_level]").select_option("4")
    form.locator("input[name=upstream_mode][value=inline]").check()
    form.locator("[data-u=type]").select_option("chash")
    form.locator("[data-u=key]").fill("mqtt_client_id")
    for i, broker in enumerate((a, b)):
        if i:
            form.locator("[data-role=add-node]").click()
        form.locator("[data-n=host]").nth(i).fill(broker.host)
        form.locator("[data-n=port]").nth(i).fill(str(broker.port))
        form.locator("[data-n=weight]").nth(i).fill("1")
    # a third row, added and removed again, must not reach the API
    form.locator("[data-role=add-node]").click()
    form.locator("[data-n=host]").nth(2).fill("10.0.0.9")
    form.locator("button[aria-label='remove node']").nth(2).click()
    screenshot(page, "route-form", hide_toast=True)
    form.locator("[data-role=save]").click()

    expect(page.locator("#view-routes")).to_be_visible()
    row = page.locator("#routes-table tr[data-id='%s']" % ROUTE)
    expect(row).to_contain_text("chash(mqtt_client_id)")
    expect(row).to_contain_text("MQTT 3.1.1")
    expect(page.locator("#toast")).to_contain_text("created")
    screenshot(page, "routes")

    status, body = admin(gp, "GET", "/stream_routes/" + ROUTE)
    assert status == 200
    value = body["value"]
    assert value["plugins"] == {"mqtt-proxy": {"protocol_name": "MQTT", "protocol_level": 4}}
    assert value["upstream"] == {"type": "chash", "key": "mqtt_client_id", "nodes": [
        {"host": a.host, "port": a.port, "weight": 1},
        {"host": b.host, "port": b.port, "weight": 1}]}
    assert (value["id"], value["name"], value["desc"]) == (
        ROUTE, "brokers", "MQTT clients, sticky by client id")
    assert "server_port" not in value and "upstream_id" not in value


def test_a_failed_save_shows_error_msg_and_keeps_what_was_typed(page, gp, brokers):
    _, before = admin(gp, "GET", "/stream_routes/" + ROUTE)
    page.locator("#routes-table tr[data-id='%s'] a:text-is('Edit')" % ROUTE).click()
    form = page.locator("#route-form")
    expect(form).to_have_attribute("data-state", "ready")
    expect(form.locator("input[name=id]")).to_have_value(ROUTE)
    form.locator("input[name=name]").fill("renamed, never saved")
    form.locator("input[name=server_port]").fill("70000")
    form.locator("input[name=remote_addr]").fill("127.0.0.0/8")
    form.locator("[data-role=save]").click()

    status = page.locator("#view-route-form [data-role=status]")
    expect(status).to_be_visible()
    expect(status).to_contain_text("Not saved (HTTP 400)")
    # the API's own error_msg, word for word
    conf = {k: v for k, v in before["value"].items() if k not in ("create_time", "update_time")}
    code, api_error = admin(gp, "PUT", "/stream_routes/" + ROUTE, dict(conf, server_port=70000))
    assert code == 400
    expect(status.locator("[data-role=error-msg]")).to_have_text(api_error["error_msg"])
    assert 'property "server_port" validation failed' in api_error["error_msg"]
    expect(form.locator("input[name=server_port]")).to_have_class(re.compile(r"\binvalid\b"))

    # nothing typed was lost, nothing reached the store
    expect(form.locator("input[name=name]")).to_have_value("renamed, never saved")
    expect(form.locator("input[name=server_port]")).to_have_value("70000")
    expect(form.locator("input[name=remote_addr]")).to_have_value("127.0.0.0/8")
    expect(form.locator("[data-n=port]")).to_have_count(2)
    assert admin(gp, "GET", "/stream_routes/" + ROUTE)[1]["value"] == before["value"]

    # the JSON view shows the same unsaved edit, without create_time/update_time
    page.click("#view-route-form [data-mode=json]")
    edited = json.loads(page.locator("#route-form textarea[name=json]").input_value())
    assert edited["server_port"] == 70000 and edited["name"] == "renamed, never saved"
    assert "create_time" not in edited and "update_time" not in edited
    page.click("#view-route-form a:text-is('Cancel')")
    expect(page.locator("#view-routes")).to_be_visible()


def test_raw_json_editor_saves_what_the_form_does_not_cover(page, gp):
    page.locator("#routes-table tr[data-id='%s'] a:text-is('JSON')" % ROUTE).click()
    textarea = page.locator("#route-form textarea[name=json]")
    expect(textarea).to_be_visible()
    conf = json.loads(textarea.input_value())
    conf["labels"] = {"team": "iot"}
    conf["upstream"]["timeout"] = {"connect": 2, "send": 60, "read": 60}
    textarea.fill(json.dumps(conf, indent=2))
    page.locator("#route-form [data-role=save]").click()
    expect(page.locator("#view-routes")).to_be_visible()
    value = admin(gp, "GET", "/stream_routes/" + ROUTE)[1]["value"]
    assert value["labels"] == {"team": "iot"}
    assert value["upstream"]["timeout"] == {"connect": 2, "send": 60, "read": 60}

    # ... and a form save afterwards keeps those fields
    page.locator("#routes-table tr[data-id='%s'] a:text-is('Edit')" % ROUTE).click()
    expect(page.locator("#route-form")).to_have_attribute("data-state", "ready")
    page.locator("#route-form input[name=desc]").fill("sticky by client id")
    page.locator("#route-form [data-role=save]").click()
    expect(page.locator("#view-routes")).to_be_visible()
    value = admin(gp, "GET", "/stream_routes/" + ROUTE)[1]["value"]
    assert value["desc"] == "sticky by client id" and value["labels"] == {"team": "iot"}
    assert value["upstream"]["timeout"]["connect"] == 2


def test_live_clients_show_up_on_their_node_and_can_be_disconnected(page, gp, brokers,
                                                                    clients):
    a, b = brokers
    mark = gp.mark()
    expected_node = {}
    for cid in two_ids_per_node(a, b):
        client = clients[cid] = Paho(cid, gp.port, username="user-" + cid).connect()
        client.subscribe("dash/#")
        line = gp.wait_for_session_line(client.local_port, "proxy request to", since=mark)
        expected_node[cid] = PROXY_TO.search(line).group(1)
    clients[sorted(expected_node)[-1]].publish("dash/hello", b"x" * 300)
    listed = {s["client_id"]: s["node"] for s in admin(gp, "GET", "/gproxy/sessions")[1]["list"]}
    assert listed == expected_node, (
        "GET /apisix/admin/gproxy/sessions does not list the live clients, so the page "
        "cannot either (does the Admin API share the proxy's registry?)")

    page.click("a[data-tab=connections]")
    rows = page.locator("#sessions-table tbody tr")
    expect(rows).to_have_count(len(expected_node))
    for cid, node in expected_node.items():
        row = session_row(page, cid)
        expect(row.locator("td[data-col=node]")).to_have_text(node)
        expect(row.locator("td[data-col=route_id]")).to_have_text(ROUTE)
        expect(row.locator("td[data-col=protocol_level]")).to_have_text("3.1.1")
        expect(row.locator("td[data-col=transport]")).to_have_text("tcp")
        expect(row.locator("td[data-col=username]")).to_have_text("user-" + cid)
        expect(row.locator("td[data-col=tls_client_cn]")).to_have_text("–")
        expect(row.locator("td[data-col=client]")).to_have_text(
            "%s:%d" % (HOST, clients[cid].local_port))
    per_node = collections.Counter(expected_node.values())
    for broker in (a, b):
        expect(page.locator("#node-bars .bar-row[data-node='%s'] .bar-value" % broker.addr)) \
            .to_have_text(str(per_node[broker.addr]))
    expect(page.locator("[data-stat=live_sessions]")).to_have_text(str(len(expected_node)))
    expect(page.locator("[data-stat=sessions_total]")).to_have_text(str(len(expected_node)))
    screenshot(page, "connections", hide_toast=True)

    # filter and sort
    one = sorted(expected_node)[1]
    page.fill("#session-filter", one)
    expect(rows).to_have_count(1)
    expect(session_row(page, one)).to_be_visible()
    page.fill("#session-filter", "")
    page.select_option("#filter-node", b.addr)  # filtered by gproxy, not in the page
    expect(rows).to_have_count(per_node[b.addr])
    for row in rows.all():
        expect(row.locator("td[data-col=node]")).to_have_text(b.addr)
    page.select_option("#filter-node", "")
    expect(rows).to_have_count(len(expected_node))
    page.click("#sessions-table th[data-sort=client_id] button")
    expect(page.locator("#sessions-table td[data-col=client_id]")).to_have_text(
        sorted(expected_node))
    page.click("#sessions-table th[data-sort=client_id] button")
    expect(page.locator("#sessions-table td[data-col=client_id]")).to_have_text(
        sorted(expected_node, reverse=True))

    # disconnect one from its row: paho sees it, the row and its bar go away
    victim = sorted(expected_node)[0]
    session_row(page, victim).locator("[data-action=disconnect]").click()
    assert clients[victim].disconnected.wait(5), "paho never saw the disconnect"
    expect(session_row(page, victim)).to_have_count(0)
    expect(rows).to_have_count(len(expected_node) - 1)
    node = expected_node[victim]
    expect(page.locator("#node-bars .bar-row[data-node='%s'] .bar-value" % node)) \
        .to_have_text(str(per_node[node] - 1))
    status, body = admin(gp, "GET", "/gproxy/sessions")
    assert victim not in [s["client_id"] for s in body["list"]]

    # disconnect all of the route, after a confirmation
    page.select_option("#bulk-route", ROUTE)
    page.click("#bulk-disconnect")
    confirm_dialog(page)
    for cid in expected_node:
        assert clients[cid].disconnected.wait(5), "%s was not disconnected" % cid
    expect(rows).to_have_count(0)
    expect(page.locator("#sessions-table + [data-role=empty]")).to_be_visible()
    assert admin(gp, "GET", "/gproxy/stats")[1]["live_sessions"] == 0


def raw_sessions(port, ids):
    socks = []
    try:
        for cid in ids:
            sock = dial(port)
            socks.append(sock)
            sock.sendall(packets.connect_v311(cid))
            assert sock.recv(4) == bytes.fromhex("20020000"), cid
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def test_sessions_come_one_page_at_a_time(page, gp):
    socks = raw_sessions(gp.port, ["page-%02d" % i for i in range(60)])
    try:
        rows = page.locator("#sessions-table tbody tr")
        page.select_option("#page-size", "25")
        oldest_first = page.locator("#sessions-table th[data-sort=connected_at]")
        oldest_first.locator("button").click()  # was: client id, descending
        expect(oldest_first).to_have_attribute("aria-sort", "ascending")
        expect(page.locator("[data-stat=live_sessions]")).to_have_text("60")
        expect(rows).to_have_count(25)
        expect(page.locator("#view-connections [data-role=page]")).to_contain_text("1–25 of 60")
        first = page.locator("#sessions-table td[data-col=client_id]").all_text_contents()
        assert first == ["page-%02d" % i for i in range(25)]
        page.click("#page-next")
        expect(page.locator("#view-connections [data-role=page]")).to_contain_text("26–50 of 60")
        expect(page.locator("#sessions-table td[data-col=client_id]").first).to_have_text("page-25")
        page.click("#page-next")
        expect(rows).to_have_count(10)
        expect(page.locator("#page-next")).to_be_disabled()
        # newest first, sorted by gproxy: page 3 now holds the oldest ten
        page.click("#sessions-table th[data-sort=connected_at] button")
        expect(page.locator("#sessions-table td[data-col=client_id]").first).to_have_text("page-59")
        expect(page.locator("#view-connections [data-role=page]")).to_contain_text("page 1 of 3")
        page.fill("#session-filter", "page-1")
        expect(rows).to_have_count(10)
        expect(page.locator("#view-connections [data-role=count]")).to_have_text("10 matching")
        page.fill("#session-filter", "")
        page.click("#sessions-table th[data-sort=connected_at] button")
        page.select_option("#page-size", "50")
    finally:
        for sock in socks:
            sock.close()
    expect(page.locator("[data-stat=live_sessions]")).to_have_text("0")
    expect(page.locator("#sessions-table tbody tr")).to_have_count(0)


def node_weights(gp, addr):
    """``(weight, metadata)`` of ``addr`` in the route and in the broker-pool upstream."""
    out = []
    for path, pick in (("/stream_routes/" + ROUTE, lambda v: v["upstream"]),
                       ("/upstreams/broker-pool", lambda v: v)):
        for n in pick(admin(gp, "GET", path)[1]["value"])["nodes"]:
            if "%s:%d" % (n["host"], n["port"]) == addr:
                out.append((n["weight"], n.get("metadata")))
    return out


def test_drain_a_node_from_the_chart_then_undrain_it(page, gp, brokers, clients):
    a, b = brokers
    ring = ApisixRing([(a.host, a.port, 1), (b.host, b.port, 1)])
    ids = two_ids_per_node(a, b)
    for cid in ids:
        clients["drain-" + cid] = Paho(cid, gp.port).connect()
    on_a = [cid for cid in ids if ring.pick(cid) == a.addr]
    bar = page.locator("#node-bars .bar-row[data-node='%s']" % a.addr)
    expect(bar.locator(".bar-value")).to_have_text(str(len(on_a)))
    page.fill("#evict-rate", "20")
    bar.locator("[data-action=drain]").click()
    confirm_dialog(page)
    expect(bar.locator(".bar-value")).to_have_text("0")
    for cid in ids:
        assert clients["drain-" + cid].disconnected.wait(5) == (cid in on_a), cid
    expect(bar.locator("[data-role=drained]")).to_be_visible()
    expect(page.locator("#evictions li").first).to_contain_text(
        "Draining %s: %d of %d closed (20/s) — done" % (a.addr, len(on_a), len(on_a)))
    assert node_weights(gp, a.addr) == [(0, {"gproxy_weight": 1}), (0, {"gproxy_weight": 2})]
    screenshot(page, "drain", hide_toast=True)
    # weight 0: a client the ring puts on a now goes to b
    with Paho(on_a[0], gp.port):
        listed = admin(gp, "GET", "/gproxy/sessions?client_id=%s" % on_a[0])[1]["list"]
        assert [s["node"] for s in listed] == [b.addr]

    bar.locator("[data-action=undrain]").click()
    expect(bar.locator("[data-role=drained]")).to_be_hidden()
    expect(bar.locator("[data-action=drain]")).to_be_visible()
    assert node_weights(gp, a.addr) == [(1, None), (2, None)]
    for cid in ids:
        clients.pop("drain-" + cid).close()


def test_a_new_broker_shows_what_would_move_and_moves_it(page, gp, brokers, clients,
                                                        module_mosquitto):
    a, b = brokers
    c = module_mosquitto("c")
    old = ApisixRing([(x.host, x.port, 1) for x in (a, b)])
    new = ApisixRing([(x.host, x.port, 1) for x in (a, b, c)])
    movers = [cid for cid in ("mv-%03d" % i for i in range(200))
              if new.pick(cid) == c.addr][:3]
    stayers = [cid for cid in ("st-%03d" % i for i in range(200))
               if new.pick(cid) == old.pick(cid)][:3]
    for cid in movers + stayers:
        clients[cid] = Paho(cid, gp.port).connect()
    expect(page.locator("[data-stat=live_sessions]")).to_have_text("6")

    route = admin(gp, "GET", "/stream_routes/" + ROUTE)[1]["value"]
    route = {k: v for k, v in route.items() if not k.endswith("_time")}
    route["upstream"]["nodes"].append({"host": c.host, "port": c.port, "weight": 1})
    assert admin(gp, "PUT", "/stream_routes/" + ROUTE, route)[0] == 200
    page.click("a[data-tab=routes]")  # back to the page: it re-reads the config at once
    page.click("a[data-tab=connections]")
    summary = page.locator("#view-connections [data-role=misplaced]")
    expect(summary).to_have_text("3 sessions would move")
    for addr, n in collections.Counter(old.pick(cid) for cid in movers).items():
        expect(page.locator("#node-bars .bar-row[data-node='%s'] [data-role=would-move]"
                            % addr)).to_have_text("%d would move" % n)
    page.click("#rebalance")
    confirm_dialog(page)
    for cid in movers:
        assert clients[cid].disconnected.wait(5), cid
    expect(summary).to_be_hidden()
    assert not any(clients[cid].disconnected.is_set() for cid in stayers)
    for cid in movers + stayers:
        clients.pop(cid).close()
    route["upstream"]["nodes"].pop()
    assert admin(gp, "PUT", "/stream_routes/" + ROUTE, route)[0] == 200


def test_delete_the_route_from_the_list_refuses_new_connections(page, gp):
    page.click("a[data-tab=routes]")
    row = page.locator("#routes-table tr[data-id='%s']" % ROUTE)
    row.locator("button:text-is('Delete')").click()
    confirm_dialog(page, accept=False)  # cancelled: nothing happens
    expect(row).to_have_count(1)
    assert admin(gp, "GET", "/stream_routes/" + ROUTE)[0] == 200

    row.locator("button:text-is('Delete')").click()
    confirm_dialog(page)
    expect(row).to_have_count(0)
    assert admin(gp, "GET", "/stream_routes/" + ROUTE) == (404, {"message": "Key not found"})

    mark = gp.mark()
    sock = dial(gp.port)
    try:
        sock.sendall(packets.connect_v311("after-delete"))
        expect_closed(sock)
    finally:
        sock.close()
    gp.wait_for_log("match(): not hit any route", since=mark)


def test_data_is_shown_as_text_never_as_markup(page, gp):
    evil = '<img src=x onerror="window.__pwned=1">'
    status, _ = admin(gp, "PUT", "/stream_routes/evil", {"name": evil, "desc": "<b>bold</b>"})
    assert status == 201
    page.click("#view-routes [data-action=reload]")
    row = page.locator("#routes-table tr[data-id=evil]")
    expect(row).to_contain_text(evil)
    expect(row).to_contain_text("<b>bold</b>")
    assert row.locator("img, b").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert admin(gp, "DELETE", "/stream_routes/evil")[0] == 200


def test_node_health_shows_in_the_per_node_chart(page, gp, brokers):
    a, b = brokers
    checks = {"active": {"type": "tcp", "healthy": {"interval": 1, "successes": 1},
                         "unhealthy": {"interval": 1, "tcp_failures": 1}}}
    status, _ = admin(gp, "PUT", "/stream_routes/checked", {"server_port": 1, "upstream": {
        "type": "roundrobin", "nodes": {a.addr: 1, b.addr: 1}, "checks": checks}})
    assert status == 201
    b.stop()  # the last test that needs the brokers
    page.click("a[data-tab=connections]")
    health = "#node-bars .bar-row[data-node='%s'] [data-health]"
    expect(page.locator(health % a.addr)).to_have_attribute("data-health", "healthy",
                                                           timeout=10000)
    expect(page.locator(health % b.addr)).to_have_attribute("data-health", "unhealthy",
                                                           timeout=10000)
    assert admin(gp, "DELETE", "/stream_routes/checked")[0] == 200


def test_sign_out_forgets_the_key(page, gp):
    page.click("#signout")
    expect(page.locator("#view-signin")).to_be_visible()
    expect(page.locator("#signin-note")).to_contain_text("Signed out")
    assert page.evaluate("sessionStorage.getItem('gproxy.adminKey')") is None
    page.goto(gp.base + "/ui/#/connections")
    expect(page.locator("#view-signin")).to_be_visible()
    expect(page.locator("#view-connections")).to_be_hidden()


def test_no_javascript_errors(page):
    assert page.js_errors == []
