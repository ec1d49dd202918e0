"""A live upgrade while 16 KiB PUBLISHes stream through walking, splicing relays.

A publisher (MQTT 5, with a Will) writes numbered 16 KiB QoS 0 PUBLISHes
through gproxy, four to a 64 KiB send; a subscriber (MQTT 5) reads them back
through gproxy from mosquitto.  Both of gproxy's sessions carry runs of large
packets, so it walks them (headers peeked with SO_PEEK_OFF, bytes spliced,
relay/splicing.py).  Before the upgrade the subscriber stops reading until
the publisher has a full window of messages out, so what gproxy relays to it
waits in the splice pipe of that session's down direction: the upgrade must
carry those bytes, and where every packet boundary is, to the new process.
(The publisher never has more than ``WINDOW`` messages unread: mosquitto drops
QoS 0 messages for a client with ``max_queued_messages`` waiting.)

Checked: every message arrives once, whole and in order, across the upgrade;
the old process says the sessions were splicing and how many bytes it read
out of their pipes; then SIGTERM ends the new process while messages still
stream, and the subscriber's stream ends with whole PUBLISHes and a
DISCONNECT (0x8B, server shutting down), the publisher gets one too, and the
broker, told DISCONNECT at a packet boundary, publishes no Will.
"""

import hashlib
import os
import re
import signal
import socket
import struct
import threading
import time

import pytest

from bench.procstat import gone
from gproxy.proxy.relay.direction import PEEK_WALK
from tests import packets as P
from tests.integration.conftest import HOST, mqtt_route, node, wait_until
from tests.integration.test_lifecycle import assert_no_will, will_watcher
from tests.integration.test_upgrade import new_pid, stop_pid

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

SIZE = 16384  # payload bytes of each PUBLISH
WINDOW = 512  # messages the publisher may have out that the subscriber has not read (8 MiB)
TOPIC = "bulk/t"
LIMIT = 40000  # messages at most (a bound on the publisher's loop)
SHUTTING_DOWN = 0x8B


def payload(seq):
    """Message ``seq``: its number, then bytes that depend on it (any change shows)."""
    head = seq.to_bytes(8, "big")
    return head + (hashlib.sha256(head).digest() * (SIZE // 32 + 1))[:SIZE - 8]


def varint(buf, pos):
    """A remaining length at ``buf[pos:]``: ``(value, bytes)``, or None if cut short."""
    value, mult = 0, 1
    for i in range(pos, min(pos + 4, len(buf))):
        value += (buf[i] & 0x7F) * mult
        if not buf[i] & 0x80:
            return value, i + 1 - pos
        mult *= 128
    return None


def packets_in(buf):
    """Whole packets at the start of ``buf``: ``([(first byte, body)], bytes used)``."""
    out, pos = [], 0
    while pos + 2 <= len(buf):
        found = varint(buf, pos + 1)
        if found is None or pos + 1 + found[1] + found[0] > len(buf):
            break
        start = pos + 1 + found[1]
        out.append((buf[pos], bytes(buf[start:start + found[0]])))
        pos = start + found[0]
    return out, pos


def read_packet(sock):
    buf = b""
    while True:
        found, used = packets_in(buf)
        if found:
            return found[0]
        chunk = sock.recv(4096)
        assert chunk, "closed before a whole packet"
        buf += chunk


def client(port, client_id, **kw):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # bytes wait in gproxy
    sock.settimeout(30)
    sock.connect((HOST, port))
    sock.sendall(P.connect_v5(client_id, **kw))
    first, body = read_packet(sock)
    assert first == 0x20 and body[1] == 0, (first, body)  # CONNACK, success
    return sock


class Subscriber:
    """Reads PUBLISHes in a thread, checking each is the next number, whole."""

    def __init__(self, port):
        self.sock = client(port, b"bulk-sub")
        self.sock.sendall(P.packet(0x82, struct.pack("!H", 1) + b"\x00"
                                   + P.encode_string(TOPIC) + b"\x00"))
        first, body = read_packet(self.sock)
        assert first == 0x90 and body[-1] == 0, (first, body)  # SUBACK, QoS 0
        self.next = 0  # the number expected next (= messages received)
        self.errors = []
        self.disconnect = None  # the DISCONNECT's body, once one came
        self.tail = b""  # bytes after the last whole packet when the stream ended
        self.ended = threading.Event()
        self.reading = threading.Event()
        self.reading.set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        buf = bytearray()
        deadline = time.monotonic() + 140
        while time.monotonic() < deadline:
            if not self.reading.wait(0.05):
                continue
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError as exc:
                self.errors.append("recv: %s" % exc)
                break
            if not chunk:
                break
            buf += chunk
            found, used = packets_in(buf)
            del buf[:used]
            for first, body in found:
                self._packet(first, body)
        self.tail = bytes(buf)
        self.ended.set()

    def _packet(self, first, body):
        if self.disconnect is not None:
            self.errors.append("a packet after the DISCONNECT: %#x" % first)
        elif first == 0xE0:
            self.disconnect = body
        elif first >> 4 != 3:
            self.errors.append("unexpected packet %#x" % first)
        else:
            topic_len = struct.unpack("!H", body[:2])[0]
            props, size = varint(body, 2 + topic_len)
            got = body[2 + topic_len + size + props:]
            if got != payload(self.next):
                seq = int.from_bytes(got[:8], "big") if len(got) >= 8 else None
                self.errors.append("message %d: got %s (%d bytes)" % (self.next, seq, len(got)))
            self.next += 1


class Publisher:
    """Publishes numbered messages in a thread, four to a send, ``WINDOW`` ahead at most."""

    def __init__(self, port, subscriber):
        self.sock = client(port, b"bulk-pub", will_topic="gp/will/bulk-pub",
                           will_payload=b"offline")
        self.subscriber = subscriber
        self.sent = 0
        self.error = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self.stop.is_set() and self.sent < LIMIT:
                if self.sent - self.subscriber.next >= WINDOW:
                    time.sleep(0.002)
                    continue
                self.sock.sendall(b"".join(P.publish(TOPIC, payload(self.sent + i), level=5)
                                           for i in range(4)))
                self.sent += 4
        except OSError as exc:  # gproxy ended the session (the last phase)
            self.error = exc


def test_an_upgrade_mid_stream_of_16k_publishes_loses_nothing_and_ends_cleanly(mosquitto,
                                                                               gproxy):
    broker = mosquitto()
    gp = gproxy([mqtt_route([node(broker)], level=5)],
                config={"gproxy": {"shutdown": {"grace": 5}}})
    watcher = will_watcher(broker)
    sub = Subscriber(gp.port)
    pub = Publisher(gp.port, sub)
    pid = None
    try:
        assert wait_until(lambda: sub.next >= 300, 60), (sub.next, sub.errors, pub.error)
        sub.reading.clear()  # the subscriber stops reading: bytes pile up in gproxy
        assert wait_until(lambda: pub.sent - sub.next >= WINDOW, 30)
        time.sleep(0.5)
        mark = gp.mark()
        gp.proc.send_signal(signal.SIGUSR2)
        pid = new_pid(gp, mark)
        assert gp.proc.wait(timeout=30) == 0, "the old process did not exit cleanly"
        line = gp.wait_for_log("bytes carried out of their pipes", since=mark)
        spliced, piped = (int(n) for n in re.search(
            r"(\d+) directions were splicing, (\d+) bytes carried", line).groups())
        assert "handed 2 sessions" in gp.wait_for_log("upgrade: handed", since=mark)
        if PEEK_WALK:  # (else 16 KiB messages are copied: nothing was in a pipe)
            assert spliced >= 1 and piped > 0, line
        at_upgrade = pub.sent
        sub.reading.set()
        assert wait_until(lambda: sub.next >= at_upgrade + 300, 60), (sub.next, sub.errors)
        assert not sub.errors, sub.errors[:5]
        os.kill(pid, signal.SIGTERM)  # mid-stream: each direction must stop at a boundary
        assert sub.ended.wait(30), "the subscriber's stream did not end"
        pub.stop.set()
        pub.thread.join(10)
        assert not sub.errors, sub.errors[:5]
        assert sub.tail == b"", "the stream ended inside a packet (%d bytes)" % len(sub.tail)
        assert sub.disconnect is not None and sub.disconnect[:1] == bytes([SHUTTING_DOWN])
        assert sub.next >= at_upgrade + 300
        pub.sock.settimeout(10)
        tail = b""
        while True:
            chunk = pub.sock.recv(65536)
            if not chunk:
                break
            tail += chunk
        found, used = packets_in(tail)
        assert used == len(tail) and found and found[-1][0] == 0xE0, tail[:64]
        assert found[-1][1][:1] == bytes([SHUTTING_DOWN])
        assert_no_will(watcher)
        assert wait_until(lambda: gone(pid), 20), "the new process did not stop"
    finally:
        pub.stop.set()
        for sock in (pub.sock, sub.sock):
            sock.close()
        watcher.close()
        if pid is not None:
            stop_pid(pid)
