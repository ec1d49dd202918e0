"""Client-side helpers for the integration tests: a paho wrapper with bounded
waits, raw-socket MQTT exchanges, and an independent model of APISIX's chash
ring (docs/apisix-behaviour.md §5.3), written here from the spec and not
imported from gproxy so that it can catch gproxy's mistakes.
"""

import bisect
import http.client
import json
import os
import queue
import socket
import struct
import threading
import zlib

from tests import packets

HOST = "127.0.0.1"
WAIT = 5.0  # seconds for any single network expectation


# -- APISIX's chash ring, from the spec ------------------------------------------

class ApisixRing:
    """resty.chash as APISIX builds it: 160 CRC-32 points per gcd-reduced weight."""

    def __init__(self, nodes):
        """``nodes``: ``[(host, port, weight), ...]``."""
        weights = [w for _, _, w in nodes]
        g = 0
        for w in weights:
            while w:
                g, w = w, g % w
        g = g or 1
        points = []
        for host, port, weight in nodes:
            name = "%s:%d" % (host, port)
            node_id = name.replace(":", "\0").encode()
            prev = 0
            for _ in range(160 * (weight // g)):
                prev = zlib.crc32(node_id + struct.pack("<I", prev)) & 0xFFFFFFFF
                points.append((prev, name))
        points.sort()
        self.hashes = [h for h, _ in points]
        self.names = [n for _, n in points]

    def pick(self, key):
        """``host:port`` owning the first point with hash >= CRC32(key), wrapping."""
        if isinstance(key, str):
            key = key.encode()
        i = bisect.bisect_left(self.hashes, zlib.crc32(key) & 0xFFFFFFFF)
        return self.names[i % len(self.names)]

    def spread(self, prefix, per_node):
        """``per_node`` keys ``prefix-0``, ``prefix-1``, ... landing on each node, in
        the order tried: which keys go where depends on the nodes' ports, which
        tests pick at random, so a fixed list of names may all land on one."""
        wanted = {name: per_node for name in set(self.names)}
        keys = []
        for n in range(100000):
            key = "%s-%d" % (prefix, n)
            node = self.pick(key)
            if wanted[node]:
                wanted[node] -= 1
                keys.append(key)
                if not any(wanted.values()):
                    return keys
        raise AssertionError("no %d keys per node among 100,000 candidates" % per_node)


# -- raw sockets -----------------------------------------------------------------

def dial(port, source=None, timeout=WAIT):
    """A blocking loopback TCP connection to ``port`` with a read timeout."""
    sock = socket.create_connection((HOST, port), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    sock.settimeout(timeout)
    return sock


def local_port(sock):
    return sock.getsockname()[1]


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError("connection closed after %d of %d bytes: %r" % (
                len(buf), n, buf))
        buf += chunk
    return buf


def expect_closed(sock):
    """Assert the peer closes without sending a byte; ``"eof"`` or ``"reset"``.

    A socket timeout (the peer kept the connection open) fails the test.
    """
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return "reset"
    except socket.timeout:
        raise AssertionError("the connection was not closed within %.1fs"
                             % sock.gettimeout()) from None
    assert data == b"", "expected the connection to close, got bytes:\n%s" % (
        packets.hexdump(data))
    return "eof"


def http_call(port, method, path, body=None, headers=None, timeout=10.0):
    """``(status, body bytes)`` of one HTTP request to a loopback listener, on a
    fresh connection; a ``body`` that is not text or bytes is sent as JSON."""
    if body is not None and not isinstance(body, (str, bytes)):
        body = json.dumps(body)
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


CONNACK_OK = bytes.fromhex("20 02 00 00")


def raw_session(port, client_id, extra=b"", source=None):
    """CONNECT (3.1.1) through ``port``, expect CONNACK accepted, DISCONNECT.

    Returns the client's local port (to find gproxy's log lines for it).
    ``extra`` is sent in the same ``sendall`` right after the CONNECT.
    """
    sock = dial(port, source)
    try:
        sock.sendall(packets.connect_v311(client_id) + extra)
        packets.assert_packet(recv_exact(sock, 4), CONNACK_OK, "CONNACK for %r" % client_id)
        sock.sendall(packets.disconnect())
        return local_port(sock)
    finally:
        sock.close()


# -- paho ------------------------------------------------------------------------

class Paho:
    """A paho-mqtt 2.x client on a background loop, with bounded waits.

    Use as a context manager so the loop thread and the connection always end.
    """

    def __init__(self, client_id, port, protocol=None, source=None, clean_session=True,
                 connect_properties=None, transport="tcp", ws_path="/mqtt",
                 tls_context=None, username=None):
        import paho.mqtt.client as mqtt
        self.mqtt = mqtt
        self.port = port
        self.source = source or ""
        self.protocol = protocol if protocol is not None else mqtt.MQTTv311
        self.connect_properties = connect_properties
        kwargs = {}
        if self.protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = clean_session
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=self.protocol, transport=transport, **kwargs)
        if transport == "websockets":
            self.client.ws_set_options(path=ws_path)
        self.client.reconnect_delay_set(30, 60)  # no silent reconnects during a test
        if tls_context is not None:
            self.client.tls_set_context(tls_context)
        if username is not None:
            self.client.username_pw_set(username, "not-logged")
        self.connected = threading.Event()
        self.connect_reason = None
        self.connack_properties = None
        self.disconnected = threading.Event()
        self.disconnect_reason = self.disconnect_properties = None
        self.messages = queue.Queue()
        self._acks = {}
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.local_port = None

    # callbacks (paho's loop thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connect_reason = reason_code
        self.connack_properties = properties
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnect_reason = reason_code
        self.disconnect_properties = properties
        self.disconnected.set()

    def _on_message(self, client, userdata, message):
        self.messages.put(message)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self._ack(mid).set()

    def _ack(self, mid):
        with self._lock:
            return self._acks.setdefault(mid, threading.Event())

    # API
    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc):
        self.close()

    def connect(self):
        kwargs = {"keepalive": 30, "bind_address": self.source}
        if self.protocol == self.mqtt.MQTTv5:
            kwargs["clean_start"] = True
            kwargs["properties"] = self.connect_properties
        self.client.connect(HOST, self.port, **kwargs)
        sock = self.client.socket()
        sock = getattr(sock, "_socket", sock)  # paho's WebSocket wrapper keeps the socket here
        self.local_port = sock.getsockname()[1]
        self.client.loop_start()
        assert self.connected.wait(WAIT), "no CONNACK for %r within %.0fs" % (
            self.client._client_id, WAIT)
        assert not self.connect_reason.is_failure, "CONNACK refused: %s" % self.connect_reason
        return self

    def subscribe(self, topic, qos=0, **kwargs):
        rc, mid = self.client.subscribe(topic, qos, **kwargs)
        assert rc == self.mqtt.MQTT_ERR_SUCCESS, "subscribe failed: %s" % rc
        assert self._ack(mid).wait(WAIT), "no SUBACK for %r" % topic

    def publish(self, topic, payload, qos=0, properties=None):
        info = self.client.publish(topic, payload, qos, properties=properties)
        assert info.rc == self.mqtt.MQTT_ERR_SUCCESS, "publish failed: %s" % info.rc
        if qos:
            info.wait_for_publish(WAIT)
            assert info.is_published(), "no PUBACK/PUBCOMP for %r" % topic
        return info

    def expect_message(self, timeout=WAIT):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no message within %.1fs" % timeout) from None

    def close(self):
        try:
            if self.connected.is_set() and not self.disconnected.is_set():
                self.client.disconnect()
                self.disconnected.wait(WAIT)
        finally:
            self.client.loop_stop()
            sock = self.client.socket()
            if sock is not None:
                sock.close()


# -- a node that drops SYNs -----------------------------------------------------------

class SynDropper:
    """A listening socket whose accept queue is full and never drained.

    ``listen(0)`` leaves room for one queued connection; two connections we
    open ourselves fill it, and Linux then drops every further SYN (the
    dialler sees a connect timeout, like a broker behind a black-holing
    firewall, not a refusal).
    """

    def __init__(self):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((HOST, 0))
        self.listener.listen(0)
        self.host, self.port = self.listener.getsockname()
        self.fillers = []
        for _ in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex((HOST, self.port))
            self.fillers.append(s)
        self._check_full()

    def _check_full(self):
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect((HOST, self.port))
        except socket.timeout:
            return
        finally:
            probe.close()
        raise AssertionError("the accept queue of %d is not full" % self.port)

    @property
    def addr(self):
        return "%s:%d" % (self.host, self.port)

    def close(self):
        for s in self.fillers:
            s.close()
        self.listener.close()


def run_short(script, tmp_path, timeout):
    """``scripts/<script> --short --json FILE`` run to the end; its JSON result."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "result.json"
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin")
    run = subprocess.run([sys.executable, os.path.join(root, "scripts", script), "--short",
                          "--json", str(out)], cwd=root, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())
