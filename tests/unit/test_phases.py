"""The session phases without sockets: match_route, find_upstream, preread, dial, replay.

A ``Session`` is built on fake endpoints (``recv`` returns scripted chunks or
raises, ``send`` records) and a real ``RouteTable``; ``netio.connect`` is
replaced by a scripted dialler, so no descriptor is ever opened.  What is
checked is what an operator and APISIX's tests see: the ``Reject`` reason
counted, the log lines in nginx's shape and APISIX's wording
(docs/apisix-behaviour.md §1-2, §5), ``session.replay``, ``session.vars`` and
the chash key.  CONNECT packets come from tests/packets.py.  The hand-off to
the relay needs real descriptors (tests/integration covers it).
"""

import errno
import logging
import socket
import time
from types import SimpleNamespace

import gevent

import pytest

from gproxy.errors import Reject
from gproxy.model.routes import RouteTable
from gproxy.proxy.accept.overload import Gate
from gproxy.proxy.session import dial as dialing
from gproxy.proxy.session import phases
from gproxy.proxy.session.dial import hash_key, session_vars
from gproxy.proxy.session.session import Proxy, Session
from gproxy.proxy.sessions.registry import Registry
from gproxy.proxy.settings import Settings
from tests import packets

CLIENT = ("127.0.0.1", 40000)
SERVER = ("127.0.0.1", 9100)
MQTT4 = {"mqtt-proxy": {"protocol_name": "MQTT", "protocol_level": 4}}
NODE_A, NODE_B = "127.0.0.1:1995", "127.0.0.2:1995"
TAIL = ", client: 127.0.0.1, server: 0.0.0.0:9100"


class FakeEndpoint:
    """A socket stand-in: ``recv`` plays ``script`` (bytes, or an exception to raise),
    then reports EOF; ``send`` records.  It has no descriptor."""

    def __init__(self, *script, send_error=None):
        self.script = list(script)
        self.reads = 0
        self.sent = bytearray()
        self.send_error = send_error
        self.closed = False

    def recv(self, size):
        self.reads += 1
        if not self.script:
            return b""
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        if len(item) > size:
            self.script.insert(0, item[size:])
        return item[:size]

    def send(self, data):
        if self.send_error is not None:
            raise self.send_error
        self.sent += data
        return len(data)

    def fileno(self):
        raise AssertionError("a unit test endpoint has no descriptor")

    def close(self):
        self.closed = True


def route(route_id="1", plugins=MQTT4, **extra):
    conf = {"id": route_id, "upstream": {"type": "chash", "key": "mqtt_client_id",
                                        "nodes": {NODE_A: 1, NODE_B: 1}}}
    if plugins:
        conf["plugins"] = plugins
    conf.update(extra)
    return {k: v for k, v in conf.items() if v is not None}


def make_session(*script, routes=(), upstreams=(), settings=None, client=CLIENT):
    table = RouteTable([route()] if not routes else routes, upstreams)
    proxy = Proxy(table, Registry(worker=0), settings or Settings(preread_timeout=5),
                  relays=SimpleNamespace())  # the relay hub is never reached here
    listener = SimpleNamespace(text="0.0.0.0:9100", phases=(), pipeline=phases.COMMON,
                               gate=Gate())
    info = proxy.registry.new_session(client, SERVER)
    return Session(proxy, listener, FakeEndpoint(*script), info)


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG, logger="gproxy")

    def lines(level=logging.DEBUG):
        return [r.getMessage() for r in caplog.records
                if r.name == "gproxy.session" and r.levelno >= level]
    return lines


class Dialler:
    """``netio.connect`` scripted per attempt: an endpoint, or the OSError it fails with."""

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.tried = []

    def __call__(self, host, port, timeout):
        self.tried.append("%s:%d" % (host, port))
        return self.outcomes.pop(0) if self.outcomes else FakeEndpoint()


@pytest.fixture
def dialler(monkeypatch):
    def install(*outcomes):
        fake = Dialler(outcomes)
        monkeypatch.setattr(dialing.netio, "connect", fake)
        return fake
    return install


def run_until_hand_off(session, monkeypatch):
    """``Session.run`` with the hand-off to the relay recorded instead of made: the
    list has the session's state and the registry's live counts at that moment
    (the session, never handed off, then cleans up as after a failure)."""
    handed = []
    monkeypatch.setattr(type(session), "hand_off", lambda self: handed.append(
        (self.info.state, dict(self.registry.per_node), len(self.registry))))
    session.run()
    return handed


# -- match_route -------------------------------------------------------------------------

def test_no_route_rejects_before_reading(logs, monkeypatch):
    s = make_session(packets.connect_v311("x"), routes=[route(server_port=1)])
    assert run_until_hand_off(s, monkeypatch) == []
    assert s.sock.reads == 0  # close before reading: an RST for a client that sent data
    assert s.registry.rejected == {"no_route": 1}
    assert logs(logging.INFO)[-1] == (
        "*1 match(): not hit any route while prereading client data" + TAIL)
    assert len(s.registry) == 0


def test_the_first_matching_route_is_tracked():
    s = make_session(routes=[route("a", remote_addr="10.0.0.0/8"), route("b"), route("c")])
    phases.match_route(s)
    assert s.route.id == "b" and s.info.route_id == "b"
    assert s.registry.get(s.info.id) is s.info and s.registry.per_route == {"b": 1}


def test_max_connections_rejects_with_a_reason():
    s = make_session(settings=Settings(max_connections=1))
    s.registry.add(s.registry.new_session(CLIENT, SERVER))
    with pytest.raises(Reject) as info:
        phases.match_route(s)
    assert info.value.reason == "limit" and info.value.level == logging.ERROR
    assert str(info.value) == "too many sessions (max_connections 1)"


# -- find_upstream -------------------------------------------------------------------------

@pytest.mark.parametrize("conf, message", [
    (route(upstream_id="9"), "failed to find upstream by id: 9"),
    ({"id": "1"}, "failed to set upstream: missing upstream configuration in Route or Service"),
])
def test_find_upstream_rejects(conf, message):
    s = make_session(routes=[conf])
    phases.match_route(s)
    with pytest.raises(Reject) as info:
        phases.find_upstream(s)
    assert (info.value.reason, str(info.value)) == ("no_upstream", message)


def test_upstream_id_wins_over_the_inline_upstream():
    up = {"id": "u", "type": "roundrobin", "nodes": {"10.0.0.9:1883": 1}}
    s = make_session(routes=[route(upstream_id="u")], upstreams=[up])
    phases.match_route(s)
    phases.find_upstream(s)
    assert s.upstream.id == "u"


# -- preread -----------------------------------------------------------------------------

def preread(s):
    phases.match_route(s)
    phases.find_upstream(s)
    phases.preread(s)


def test_whole_connect_sets_vars_replay_and_logs_the_client_id(logs):
    connect = packets.connect_v311("clint-111")
    s = make_session(connect)
    preread(s)
    assert s.replay == connect
    assert s.vars == {"mqtt_client_id": b"clint-111"}
    assert (s.info.client_id, s.info.protocol_level) == ("clint-111", 4)
    assert logs(logging.INFO)[-1] == (
        "*1 mqtt client id: clint-111 while prereading client data" + TAIL)


def test_connect_in_byte_chunks_keeps_every_byte_read_for_the_replay():
    wire = packets.connect_v311("trickle") + packets.publish("a/b", b"after")
    chunks = [wire[i:i + 1] for i in range(len(packets.connect_v311("trickle")) - 1)]
    chunks.append(wire[len(chunks):])  # the CONNECT's last byte and the PUBLISH at once
    s = make_session(*chunks)
    preread(s)
    assert s.replay == wire  # every byte peeked, unchanged
    assert s.sock.reads == len(chunks)


def test_an_empty_client_id_leaves_the_var_unset(logs):
    s = make_session(packets.connect_v311(""))
    preread(s)
    assert "mqtt_client_id" not in s.vars
    assert logs(logging.INFO)[-1] == "*1 mqtt client id:  while prereading client data" + TAIL


def test_a_client_id_cannot_forge_a_log_line(logs):
    s = make_session(packets.connect_v311(b"evil\n2026/01/01 [error] forged\x00"))
    preread(s)
    line = logs(logging.INFO)[-1]
    assert "\n" not in line and "\x00" not in line
    assert line.startswith("*1 mqtt client id: evil\\x0a2026/01/01 [error] forged\\x00 while ")


@pytest.mark.parametrize("script, reason, first_line", [
    ([socket.timeout("timed out")], "timeout", "failed to read the msg header: timeout"),
    ([b"\x10", socket.timeout("timed out")], "timeout",
     "failed to read the msg header: timeout"),
    ([b"\x10\x20\x00", socket.timeout("timed out")], "timeout",
     "failed to read the Connect Command: timeout"),
    ([], "closed", "failed to read the msg header: closed"),
    ([b"\x10\x20\x00\x04MQ"], "closed", "failed to read the Connect Command: closed"),
    ([ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")], "closed",
     "failed to read the msg header: Connection reset by peer"),
    ([b"mmm"], "malformed", "failed to parse the msg header: "
                            "Received unexpected MQTT packet type+flags: 109"),
    ([packets.connect_v5("five")], "protocol_level", "expect protocol level: 4, but got 5"),
    ([packets.connect_v311("n", protocol_name=b"MQTX")], "protocol_name",
     "expect protocol name: MQTT, but got MQTX"),
])
def test_preread_rejections(logs, monkeypatch, script, reason, first_line):
    s = make_session(*script)
    assert run_until_hand_off(s, monkeypatch) == []
    assert s.registry.rejected == {reason: 1}
    assert logs(logging.WARNING)[-2:] == [
        "*1 %s while prereading client data%s" % (first_line, TAIL),
        "*1 mqtt-proxy exits with status code 503 while prereading client data" + TAIL]
    assert len(s.registry) == 0  # tracked from the match, removed at the end


def test_a_connect_larger_than_the_buffer_is_rejected_early():
    head = packets.fixed_header(packets.CONNECT, 100) + b"\x00\x04MQTT"
    s = make_session(head, settings=Settings(max_packet=64))
    with pytest.raises(Reject) as info:
        preread(s)
    assert info.value.reason == "too_large"
    assert s.sock.reads == 1  # it did not wait for the rest


# -- the chash key and the variables it may name ------------------------------------------

def test_session_vars_are_nginx_variables_plus_what_phases_set():
    s = make_session(client=("10.1.2.3", 5555))
    s.vars["mqtt_client_id"] = b"abc"
    assert session_vars(s) == {"remote_addr": "10.1.2.3", "remote_port": "5555",
                               "server_addr": "127.0.0.1", "server_port": "9100",
                               "mqtt_client_id": b"abc"}


def upstream(**conf):
    base = {"type": "chash", "key": "mqtt_client_id", "nodes": {NODE_A: 1, NODE_B: 1}}
    base.update(conf)
    return RouteTable([dict(route(), upstream=base)]).routes[0].upstream


def test_hash_key_is_the_client_id():
    s = make_session()
    s.vars["mqtt_client_id"] = b"clint-111"
    assert hash_key(s, upstream()) == b"clint-111"


def test_hash_key_falls_back_to_the_client_address(logs):
    s = make_session(client=("10.1.2.3", 5555))
    assert hash_key(s, upstream()) == b"10.1.2.3"
    assert logs(logging.WARNING)[-1] == (
        "*1 chash_key fetch is nil, use default chash_key remote_addr: 10.1.2.3, "
        "client: 10.1.2.3, server: 0.0.0.0:9100")


def test_hash_key_vars_combinations():
    s = make_session(client=("10.1.2.3", 5555))
    s.vars["mqtt_client_id"] = b"id"
    up = upstream(hash_on="vars_combinations", key="$remote_addr-$mqtt_client_id")
    assert hash_key(s, up) == b"10.1.2.3-id"


def test_no_hash_key_for_roundrobin():
    assert hash_key(make_session(), upstream(type="roundrobin")) is None


def test_one_node_keeps_the_key_for_rebalancing_but_logs_no_fallback(logs):
    # one node skips the balancer (APISIX), so nothing is logged; the key is still
    # worked out, for the session record: where it belongs once nodes are added
    s = make_session(client=("10.1.2.3", 5555))
    assert hash_key(s, upstream(nodes={NODE_A: 1})) == b"10.1.2.3"
    assert not [line for line in logs(logging.WARNING) if "chash_key" in line]


# -- dial and replay -------------------------------------------------------------------------

def connected_session(dialler, monkeypatch, *outcomes):
    s = make_session(packets.connect_v311("clint-111"),
                     routes=[route(upstream={"type": "roundrobin",
                                             "nodes": {NODE_A: 1, NODE_B: 1}})])
    fake = dialler(*outcomes)
    return s, fake, run_until_hand_off(s, monkeypatch)


def test_dial_moves_on_to_the_next_node_and_replays(dialler, monkeypatch, logs):
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    s, fake, handed = connected_session(dialler, monkeypatch, refused)
    assert len(handed) == 1
    assert sorted(fake.tried) == [NODE_A, NODE_B]  # the first failed, then the other
    first, second = fake.tried
    assert s.upstream_sock.sent == packets.connect_v311("clint-111")
    assert s.info.bytes_in == len(packets.connect_v311("clint-111"))
    assert (s.info.node, s.peer) == (second, second)
    assert handed == [("connecting", {second: 1}, 1)]
    assert logs(logging.INFO)[-4:] == [
        "*1 mqtt client id: clint-111 while prereading client data" + TAIL,
        '*1 proxy request to %s while connecting to upstream%s, upstream: "%s"'
        % (first, TAIL, first),
        '*1 connect() failed (111: Connection refused) while connecting to upstream%s, '
        'upstream: "%s"' % (TAIL, first),
        '*1 proxy request to %s while connecting to upstream%s, upstream: "%s"'
        % (second, TAIL, second)]


def test_every_node_down_is_a_rejection(dialler, monkeypatch, logs):
    down = [socket.timeout("timed out")] * 2
    s, fake, handed = connected_session(dialler, monkeypatch, *down)
    assert handed == [] and sorted(fake.tried) == [NODE_A, NODE_B]
    assert s.registry.rejected == {"upstream_unavailable": 1}
    assert logs(logging.ERROR)[-1] == (
        "*1 all upstream servers tried: %s, %s while connecting to upstream%s, "
        'upstream: "%s"' % (fake.tried[0], fake.tried[1], TAIL, fake.tried[1]))
    assert "110: Connection timed out" in logs(logging.ERROR)[0]


def test_a_failed_replay_is_a_rejection_and_closes_the_upstream(dialler, monkeypatch, logs):
    broken = FakeEndpoint(send_error=BrokenPipeError(errno.EPIPE, "Broken pipe"))
    s, _, handed = connected_session(dialler, monkeypatch, broken)
    assert handed == []
    assert s.registry.rejected == {"replay_failed": 1}
    assert broken.closed  # never handed off: the session's greenlet closed it
    assert logs(logging.ERROR)[-1].startswith(
        "*1 failed to replay the CONNECT upstream: Broken pipe while proxying connection")


# -- least_conn and ewma at dial (docs/apisix-behaviour.md §5.4) ------------------------

def balanced_session(dialler, monkeypatch, kind, *outcomes):
    s = make_session(packets.connect_v311("lc-1"),
                     routes=[route(upstream={"type": kind, "nodes": {NODE_A: 1, NODE_B: 1}})])
    fake = dialler(*outcomes)
    return s, fake, run_until_hand_off(s, monkeypatch)


def counts(s):
    return dict(s.upstream.last_balancer._groups[0].state.conns)


def test_least_conn_counts_from_the_pick_and_gives_a_failed_dial_back(dialler, monkeypatch):
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    seen = []
    real = dialing._attempt

    def attempt(s, upstream, balancer, node, timeout, health):
        seen.append(counts(s))  # what the next session's pick would see meanwhile
        return real(s, upstream, balancer, node, timeout, health)
    monkeypatch.setattr(dialing, "_attempt", attempt)
    s, fake, handed = balanced_session(dialler, monkeypatch, "least_conn", refused)
    first, second = fake.tried
    assert seen == [{first: 1}, {second: 1}]  # the refused node was released first
    assert len(handed) == 1
    assert counts(s) == {}  # never handed off here: the session's end released it


def test_least_conn_session_holds_its_node_until_it_ends(dialler, monkeypatch):
    s = make_session(packets.connect_v311("lc-2"),
                     routes=[route(upstream={"type": "least_conn",
                                             "nodes": {NODE_A: 1, NODE_B: 1}})])
    dialler()
    for phase in phases.COMMON:
        phase(s)
    assert counts(s) == {s.info.node: 1}
    s.ended()
    assert counts(s) == {}


def test_ewma_dials_and_learns_the_connect_time(dialler, monkeypatch):
    s, fake, handed = balanced_session(dialler, monkeypatch, "ewma")
    assert len(handed) == 1 and fake.tried == [s.info.node]
    assert s.upstream.last_balancer._groups[0].table._entries.keys() == {s.info.node}


def test_a_type_apisix_does_not_know_is_refused_at_dial(dialler, monkeypatch, logs):
    s, fake, handed = balanced_session(dialler, monkeypatch, "random")
    assert handed == [] and fake.tried == []
    assert s.registry.rejected == {"upstream_unavailable": 1}
    assert logs(logging.ERROR)[-1].startswith(
        "*1 failed to pick server: invalid balancer type: random while connecting")


# -- DNS: bounded by the connect timeout and the retries' deadline ----------------------

class SlowResolver:
    """``getaddrinfo`` that answers IP-like names at once and never answers ``slow.*``."""

    def __init__(self):
        self.asked = []

    def __call__(self, host, port, family=0, kind=0):
        self.asked.append(host)
        if host.startswith("slow."):
            gevent.sleep(30)  # a resolver that does not answer (resolv.conf: 5 s a try)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.9", port))]


@pytest.mark.parametrize("timeouts", [{"timeout": {"connect": 0.2, "send": 5, "read": 5}},
                                      {"timeout": {"connect": 30, "send": 5, "read": 5},
                                       "retry_timeout": 0.2}],
                         ids=["connect_timeout", "retry_timeout"])
def test_a_name_that_does_not_resolve_costs_the_connect_timeout(dialler, monkeypatch, logs,
                                                                timeouts):
    resolver = SlowResolver()
    monkeypatch.setattr(dialing.netio.gsocket, "getaddrinfo", resolver)
    upstream = dict({"type": "roundrobin", "nodes": {"slow.example:1995": 1,
                                                     "fast.example:1995": 1}}, **timeouts)
    s = make_session(packets.connect_v311("dns-1"), routes=[route(upstream=upstream)])
    fake = dialler()
    started = time.monotonic()
    handed = run_until_hand_off(s, monkeypatch)
    took = time.monotonic() - started
    assert took < 2.0, "resolving took %.1fs" % took
    assert sorted(resolver.asked) == ["fast.example", "slow.example"]
    assert fake.tried == ["127.0.0.9:1995"] and len(handed) == 1
    assert "*1 failed to parse domain: slow.example, error: resolving timed out" in \
        " ".join(logs(logging.ERROR))
