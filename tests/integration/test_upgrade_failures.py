"""A live upgrade that fails is never worse than no upgrade: the old process keeps
(or takes back) every session and listener, says why, and goes on serving.

The successor that misbehaves is ``fake_successor.py`` (an independent speaker of
the handover protocol), started by a real gproxy through ``gproxy.upgrade.command``;
the one that cannot read its config is the real gproxy.  Each test keeps a paho
client with a Will connected through gproxy across the failed upgrade and checks
it was never disconnected, still gets its messages both ways, that the listener
still accepts and that no Will was published.
"""

import os
import signal
import sys

import pytest

from tests import needs
from tests.integration.conftest import mqtt_route, node
from tests.integration.helpers import Paho
from tests.integration.test_lifecycle import assert_no_will, will_watcher, with_will

mqtt = needs.module("paho.mqtt.client", "bash scripts/venv.sh test")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

FAKE = os.path.join(os.path.dirname(__file__), "fake_successor.py")


@pytest.fixture
def setup(mosquitto, gproxy, tmp_path, monkeypatch):
    fake_log = str(tmp_path / "fake.log")
    monkeypatch.setenv("FAKE_SUCCESSOR_LOG", fake_log)
    broker = mosquitto()

    def make(mode=None, **upgrade):
        if mode is not None:
            upgrade["command"] = [sys.executable, FAKE, mode]
        gp = gproxy([mqtt_route([node(broker)], level=4)],
                    config={"gproxy": {"upgrade": upgrade}} if upgrade else None)
        watcher = will_watcher(broker)
        client = with_will("survivor", gp.port, mqtt.MQTTv311)
        client.subscribe("gp/echo", 1)
        return gp, watcher, client
    yield broker, make, fake_log


def still_serving(broker, gp, watcher, client, mark):
    """Nothing happened to the session, the listener or the broker's view."""
    assert gp.proc.poll() is None, "the old process exited"
    assert not client.disconnected.is_set()
    client.publish("gp/echo", b"after", 1)
    assert client.expect_message().payload == b"after"
    with Paho("newcomer", gp.port) as newcomer:  # the listener accepts
        newcomer.publish("gp/echo", b"newcomer", 1)
    assert client.expect_message().payload == b"newcomer"
    assert not [ln for ln in broker.log.lines(mark) if "survivor" in ln and (
        "connected" in ln or "closed" in ln or "timeout" in ln)]  # no drop, no reconnect
    assert_no_will(watcher)
    client.close()
    watcher.close()


def test_a_new_process_that_cannot_read_its_config_changes_nothing(setup):
    broker, make, _ = setup
    gp, watcher, client = make()
    with open(gp.config_path, "w") as fh:
        fh.write("gproxy:\n  max_connections: many\n")  # the new process exits 2
    mark, bmark = gp.mark(), broker.log.mark()
    gp.proc.send_signal(signal.SIGUSR2)
    line = gp.wait_for_log("this process keeps every session and listener", 30, since=mark)
    assert "exited with code 2" in line, line
    still_serving(broker, gp, watcher, client, bmark)


@pytest.mark.parametrize("mode, why, it_said", [
    ("format", "reads handover format 99, this one writes 1", "started format"),
    # it really held the session's descriptors, and its state, when it died
    ("die-mid-way", "the other process went away",
     "got stage with 2 descriptors\ngot staged with 0 descriptors\n"
     "got sessions with 0 descriptors"),
])
def test_a_successor_that_fails_leaves_everything_with_the_old_process(setup, mode, why,
                                                                      it_said):
    broker, make, fake_log = setup
    gp, watcher, client = make(mode)
    mark, bmark = gp.mark(), broker.log.mark()
    gp.proc.send_signal(signal.SIGUSR2)
    line = gp.wait_for_log("this process keeps every session and listener", 30, since=mark)
    assert why in line, line
    with open(fake_log) as fh:
        assert it_said in fh.read()
    still_serving(broker, gp, watcher, client, bmark)


def test_a_second_usr2_during_a_handover_is_refused(setup):
    broker, make, _ = setup
    gp, watcher, client = make("silent", timeout=3)
    mark, bmark = gp.mark(), broker.log.mark()
    gp.proc.send_signal(signal.SIGUSR2)
    gp.wait_for_log("upgrade: starting", 10, since=mark)
    gp.proc.send_signal(signal.SIGUSR2)
    gp.wait_for_log("upgrade: refused: a handover is already in progress", 10, since=mark)
    line = gp.wait_for_log("this process keeps every session and listener", 15, since=mark)
    assert "no answer within 3s" in line, line
    again = gp.mark()
    gp.proc.send_signal(signal.SIGUSR2)  # once it is over, the next one starts
    gp.wait_for_log("upgrade: starting", 10, since=again)
    gp.wait_for_log("this process keeps every session and listener", 15, since=again)
    still_serving(broker, gp, watcher, client, bmark)
