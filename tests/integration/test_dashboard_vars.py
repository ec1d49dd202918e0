"""The route editor's "chosen by the CONNECT" part in a real browser (docs/routing.md).

Debian's chromium, driven by Playwright, builds a tenant route with ``vars``
rows, a priority and a canary through the form; the Admin API confirms what
was stored, paho clients confirm where the route sends them (real mosquitto
brokers), a bad regex is refused with the API's own message and nothing
stored, and a rule the rows cannot show (OR) is edited as JSON and kept
as it was.  The tests run in file order and share one gproxy and one page.
"""

import json
import os
import pathlib

import pytest

from tests import needs
from tests.integration.browser import browser, new_page, require_browser  # noqa: F401 (a fixture)
from tests.integration.conftest import HOST, mqtt_route, node, wait_listening
from tests.integration.helpers import Paho, http_call

sync_api = require_browser("the dashboard tests")
needs.module("paho.mqtt.client", "bash scripts/venv.sh test")
expect = sync_api.expect

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(90)]

KEY = "dashboard-vars-key-0123456789abcdef"
WAIT_MS = 5000
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def brokers(module_mosquitto):
    return module_mosquitto("tenant-a"), module_mosquitto("default"), module_mosquitto("canary")


@pytest.fixture(scope="module")
def gp(brokers, module_gproxy):
    _, default, canary = brokers
    proxy = module_gproxy([mqtt_route([node(default)], route_id="default", type_="roundrobin")],
                          upstreams=[{"id": "canary", "type": "roundrobin",
                                      "nodes": [node(canary)]}],
                          config={"deployment": {"admin": {"admin_key": [
                              {"name": "admin", "key": KEY, "role": "admin"}]}}})
    wait_listening(proxy.admin_port, proxy.proc, timeout=10, what="gproxy admin")
    proxy.base = "http://%s:%d" % (HOST, proxy.admin_port)
    return proxy


@pytest.fixture(scope="module")
def page(browser, gp):
    pg = new_page(browser, WAIT_MS, viewport={"width": 1280, "height": 900}, locale="en-US")
    pg.goto(gp.base + "/")
    pg.fill("#signin-key", KEY)
    pg.click("#signin-submit")
    expect(pg.locator("#view-routes")).to_be_visible()
    yield pg
    pg.context.close()


def admin(gp, method, path, body=None):
    status, raw = http_call(gp.admin_port, method, "/apisix/admin" + path, body,
                            {"X-API-KEY": KEY})
    return status, json.loads(raw or b"null")


def stored(gp, rid):
    value = admin(gp, "GET", "/stream_routes/" + rid)[1]["value"]
    return {k: v for k, v in value.items() if not k.endswith("_time")}


def condition(form, i, name, op, value, negated=False):
    form.locator("[data-role=add-condition]").click()
    row = form.locator("table.conditions tbody tr").nth(i)
    row.locator("[data-c=name]").select_option(name)
    row.locator("[data-c=op]").select_option(op)
    row.locator("[data-c=value]").fill(value)
    if negated:
        row.locator("[data-c=not]").check()


def test_build_a_tenant_route_with_conditions_priority_and_a_canary(page, gp, brokers):
    a, _, _ = brokers
    page.click("#new-route")
    form = page.locator("#route-form")
    expect(form).to_have_attribute("data-state", "ready")
    form.locator("input[name=id]").fill("tenant-a")
    condition(form, 0, "mqtt_username", "==", "tenant-a")
    condition(form, 1, "mqtt_client_id", "~~", "^test-", negated=True)
    condition(form, 2, "mqtt_protocol_level", "in", "4, 5")
    form.locator("input[name=priority]").fill("10")
    form.locator("select[name=canary_upstream]").select_option("canary")
    form.locator("input[name=canary_percent]").fill("0")
    form.locator("[data-u=type]").select_option("roundrobin")
    form.locator("[data-n=host]").nth(0).fill(a.host)
    form.locator("[data-n=port]").nth(0).fill(str(a.port))
    if os.environ.get("GPROXY_SCREENSHOTS") == "1":  # for docs/routing.md
        form.locator("[data-role=mqtt-extra]").screenshot(path=str(DOCS / "dashboard-route-vars.png"))
    form.locator("[data-role=save]").click()
    row = page.locator("#routes-table tr[data-id=tenant-a]")
    expect(row).to_contain_text("mqtt_username == tenant-a and mqtt_client_id !~~ ^test-")
    expect(row).to_contain_text("priority 10")
    assert stored(gp, "tenant-a")["plugins"] == {"mqtt-proxy": {
        "protocol_name": "MQTT", "protocol_level": 4, "priority": 10,
        "vars": [["mqtt_username", "==", "tenant-a"], ["mqtt_client_id", "!", "~~", "^test-"],
                 ["mqtt_protocol_level", "in", ["4", "5"]]],
        "traffic_split": {"weighted_upstreams": [{"upstream_id": "canary", "weight": 0},
                                                 {"weight": 100}]}}}


def test_the_route_built_in_the_browser_routes_real_clients(gp, brokers):
    a, default, _ = brokers
    marks = a.log.mark(), default.log.mark()
    with Paho("dev-1", gp.port, username="tenant-a"), Paho("test-1", gp.port,
                                                           username="tenant-a"), \
            Paho("dev-2", gp.port, username="tenant-b"):
        pass
    a.wait_for_client("dev-1", since=marks[0])
    default.wait_for_client("test-1", since=marks[1])  # the "not ~~" condition
    default.wait_for_client("dev-2", since=marks[1])
    assert "dev-1" not in default.client_ids(marks[1])


def test_raise_the_canary_from_the_form(page, gp, brokers):
    _, _, canary = brokers
    page.locator("#routes-table tr[data-id=tenant-a] a:text-is('Edit')").click()
    form = page.locator("#route-form")
    expect(form).to_have_attribute("data-state", "ready")
    expect(form.locator("table.conditions tbody tr")).to_have_count(3)
    expect(form.locator("table.conditions tbody tr").nth(2).locator("[data-c=value]")) \
        .to_have_value("4, 5")
    expect(form.locator("input[name=priority]")).to_have_value("10")
    expect(form.locator("input[name=canary_percent]")).to_have_value("0")
    form.locator("input[name=canary_percent]").fill("100")
    form.locator("[data-role=save]").click()
    expect(page.locator("#view-routes")).to_be_visible()
    split = stored(gp, "tenant-a")["plugins"]["mqtt-proxy"]["traffic_split"]
    assert split == {"weighted_upstreams": [{"upstream_id": "canary", "weight": 100},
                                            {"weight": 0}]}
    mark = canary.log.mark()
    with Paho("dev-3", gp.port, username="tenant-a"):
        pass
    canary.wait_for_client("dev-3", since=mark)


def test_a_bad_regex_is_refused_in_the_apis_words_and_nothing_is_lost(page, gp):
    before = stored(gp, "tenant-a")
    page.locator("#routes-table tr[data-id=tenant-a] a:text-is('Edit')").click()
    form = page.locator("#route-form")
    expect(form).to_have_attribute("data-state", "ready")
    form.locator("table.conditions tbody tr").nth(1).locator("[data-c=value]").fill("(test")
    form.locator("[data-role=save]").click()
    status = page.locator("#view-route-form [data-role=status]")
    expect(status).to_contain_text("Not saved (HTTP 400)")
    expect(status.locator("[data-role=error-msg]")).to_have_text(
        "failed to check the configuration of stream plugin [mqtt-proxy]: failed to validate "
        "the 'vars' expression: invalid regex '(test': missing ): (test")
    expect(form.locator("[data-role=vars-rows]")).to_have_class("invalid")
    expect(form.locator("table.conditions tbody tr").nth(1).locator("[data-c=value]")) \
        .to_have_value("(test")
    assert stored(gp, "tenant-a") == before
    page.click("#view-route-form a:text-is('Cancel')")


def test_a_rule_with_or_is_edited_as_json_and_kept(page, gp, brokers):
    a, _, _ = brokers
    rule = ["OR", ["mqtt_username", "==", "x"], ["AND", ["sni", "~*", "^x\\."],
                                                  ["server_port", ">", 1000]]]
    route = mqtt_route([node(a)], route_id="or-rule", type_="roundrobin")
    route["plugins"]["mqtt-proxy"]["vars"] = rule
    del route["id"]
    assert admin(gp, "PUT", "/stream_routes/or-rule", route)[0] == 201
    page.click("a[data-tab=upstreams]")
    page.click("a[data-tab=routes]")
    page.locator("#routes-table tr[data-id=or-rule] a:text-is('Edit')").click()
    form = page.locator("#route-form")
    expect(form).to_have_attribute("data-state", "ready")
    expect(form.locator("[data-role=vars-rows]")).to_be_hidden()
    textarea = form.locator("textarea[name=vars_json]")
    expect(textarea).to_be_visible()
    assert json.loads(textarea.input_value()) == rule
    form.locator("input[name=name]").fill("or rule")
    form.locator("[data-role=save]").click()
    expect(page.locator("#view-routes")).to_be_visible()
    value = stored(gp, "or-rule")
    assert value["name"] == "or rule" and value["plugins"]["mqtt-proxy"]["vars"] == rule


def test_no_javascript_errors(page):
    assert page.js_errors == []
