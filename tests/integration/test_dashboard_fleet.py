"""The dashboard's fleet views in a real browser: the Instances page and the
Connections page's "Whole fleet", against two gproxy instances on a real etcd
(and one on the file store, whose page says it has no fleet).

Debian's chromium driven by Playwright's sync API; paho clients through both
instances to a mosquitto broker.  The tests run in file order on one page.
"""

import json
import os
import pathlib

import pytest

from tests import needs
from tests.integration.browser import browser, new_page, require_browser  # noqa: F401 (a fixture)
from tests.integration.conftest import HOST, wait_listening, wait_until
from tests.integration.etcd import etcd, needs_etcd  # noqa: F401 (a fixture)
from tests.integration.helpers import Paho, http_call

sync_api = require_browser("the dashboard's fleet tests")
needs.module("paho.mqtt.client", "bash scripts/venv.sh test")
expect = sync_api.expect
pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(120),
              needs_etcd]
KEY = "fleet-dashboard-key-0123456789abcdef"
WAIT_MS = 8000
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"


def screenshot(page, name):
    """docs/dashboard-<name>.png, only when GPROXY_SCREENSHOTS=1 (as test_dashboard)."""
    if os.environ.get("GPROXY_SCREENSHOTS") == "1":
        page.screenshot(path=str(DOCS / ("dashboard-%s.png" % name)))


def key_config(extra=None):
    config = {"deployment": {"admin": {"admin_key": [{"name": "admin", "key": KEY,
                                                       "role": "admin"}]}}}
    for section, values in (extra or {}).items():
        config.setdefault(section, {}).update(values)
    return config


@pytest.fixture(scope="module")
def pair(etcd, module_gproxy, module_mosquitto):
    broker = module_mosquitto("a")
    out = []
    for ident in ("gp-a", "gp-b"):
        config = key_config(dict(etcd.etcd_config("/dash"), apisix={"id": ident}))
        proxy = module_gproxy([], config=config)
        wait_listening(proxy.admin_port, proxy.proc, what="gproxy admin")
        proxy.base = "http://%s:%d" % (HOST, proxy.admin_port)
        out.append(proxy)
    route = {"plugins": {"mqtt-proxy": {"protocol_level": 4}},
             "upstream": {"type": "roundrobin", "nodes": [
                 {"host": broker.host, "port": broker.port, "weight": 1}]}}
    assert admin(out[0], "PUT", "/stream_routes/1", route)[0] == 201
    assert wait_until(lambda: admin(out[1], "GET", "/stream_routes/1")[0] == 200, 10)
    assert wait_until(lambda: admin(out[0], "GET", "/gproxy/instances")[1]["total"] == 2, 10)
    return out, broker


@pytest.fixture(scope="module")
def page(browser):
    pg = new_page(browser, WAIT_MS, viewport={"width": 1280, "height": 900}, locale="en-US")
    yield pg
    pg.context.close()


@pytest.fixture(scope="module")
def clients(pair):
    (a, b), _ = pair
    opened = {cid: Paho(cid, proxy.port).connect()
              for cid, proxy in (("on-a-1", a), ("on-a-2", a), ("on-b-1", b))}
    yield opened
    for client in opened.values():
        client.close()


def admin(proxy, method, path, body=None):
    status, raw = http_call(proxy.admin_port, method, "/apisix/admin" + path,
                            None if body is None else json.dumps(body), {"X-API-KEY": KEY})
    return status, json.loads(raw or b"{}")


def sign_in(page, proxy, where):
    page.goto(proxy.base + "/ui/#/signin")
    page.fill("#signin-key", KEY)
    page.click("#signin-submit")
    expect(page.locator("#view-routes")).to_be_visible()
    page.goto(proxy.base + "/ui/" + where)


def test_the_instances_page_lists_the_fleet_with_each_share(page, pair, clients):
    (a, b), broker = pair
    sign_in(page, a, "#/instances")
    rows = page.locator("#instances-table tbody tr")
    expect(rows).to_have_count(2)
    row_a, row_b = (page.locator("#instances-table tr[data-instance='%s']" % i)
                    for i in ("gp-a", "gp-b"))
    expect(row_a.locator("[data-role=self]")).to_have_text("this one")
    expect(row_b.locator("[data-role=self]")).to_have_count(0)
    expect(row_a.locator("[data-role=live]")).to_have_text("2")
    expect(row_b.locator("[data-role=live]")).to_have_text("1")
    expect(row_b).to_contain_text("http://%s:%d" % (HOST, b.admin_port))
    expect(row_b.locator("[data-role=status]")).to_have_text("serving")
    node = page.locator("#fleet-nodes tr[data-node='%s']" % broker.addr)
    expect(node.locator("[data-role=fleet-total]")).to_have_text("3")
    expect(node.locator("td[data-instance=gp-a]")).to_have_text("2")
    expect(node.locator("td[data-instance=gp-b]")).to_have_text("1")
    expect(page.locator("[data-role=fleet-note]")).to_be_hidden()
    screenshot(page, "instances")


def test_whole_fleet_lists_every_instances_sessions_and_ends_one_held_elsewhere(page, pair,
                                                                              clients):
    page.click("a[data-tab=connections]")
    rows = page.locator("#sessions-table tbody tr")
    expect(rows).to_have_count(2)  # this instance's
    expect(page.locator("#sessions-table th[data-col=instance]")).to_be_hidden()
    page.check("#fleet-wide")
    expect(rows).to_have_count(3)
    expect(page.locator("#sessions-table th[data-col=instance]")).to_be_visible()
    held = page.locator("#sessions-table tr[data-client-id='on-b-1']")
    expect(held.locator("td[data-col=instance]")).to_have_text("gp-b")
    expect(page.locator("[data-stat=live_sessions]")).to_have_text("3")
    held.locator("[data-action=disconnect]").click()
    assert clients["on-b-1"].disconnected.wait(5), "the session on gp-b was not ended"
    expect(rows).to_have_count(2)
    (a, b), _ = pair
    assert admin(b, "GET", "/gproxy/stats")[1]["live_sessions"] == 0


def test_an_instance_on_the_file_store_says_it_has_no_fleet(page, module_gproxy):
    solo = module_gproxy([], config=key_config())
    wait_listening(solo.admin_port, solo.proc, what="gproxy admin")
    solo.base = "http://%s:%d" % (HOST, solo.admin_port)
    sign_in(page, solo, "#/instances")
    expect(page.locator("[data-role=fleet-note]")).to_contain_text(
        "fleet=true needs the etcd store")
    expect(page.locator("#instances-table tbody tr")).to_have_count(1)


def test_no_javascript_errors(page):
    assert page.js_errors == []
