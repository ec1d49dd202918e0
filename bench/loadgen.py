"""Load-generator worker bodies: each runs in its own forked process.

Raw blocking sockets and pre-built packets only (no MQTT library in the hot
loop).  A worker reports one picklable result on its pipe, including its own
CPU seconds so the harness can show the load generator is not the bottleneck.
Every socket has a timeout and every loop a deadline.
"""

import errno
import select
import socket
import time
from array import array

from bench import mqttwire, wswire
from bench.procstat import self_cpu_seconds


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "closed by peer")
        data += chunk
    return data


def _error_name(exc):
    if isinstance(exc, socket.timeout):
        return "timeout"
    return errno.errorcode.get(getattr(exc, "errno", None) or 0, type(exc).__name__)


def _tls_wrap(sock, tls):
    """``sock`` after a full TLS handshake (``tls``: (CA file, SNI)), or as it is."""
    if tls is None:
        return sock
    from bench.tlsbench import client_context
    try:
        return client_context(tls).wrap_socket(sock, server_hostname=tls[1])
    except BaseException:
        sock.close()
        raise


def mqtt_session(addr, client_id, timeout, ws=False, tls=None):
    """A socket past CONNECT/CONNACK (keep-alive 0: the broker never times it out).

    ``ws``: MQTT over WebSocket (the socket is then a ``wswire.WsSocket``);
    ``tls``: MQTT over TLS (CA file, SNI).
    """
    sock = socket.create_connection(addr, timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = _tls_wrap(sock, tls)
    try:
        if ws:
            sock = wswire.WsSocket(sock).handshake(*addr)
        sock.sendall(mqttwire.connect(client_id))
        got = recv_exact(sock, 4)
        if got != mqttwire.CONNACK_OK:
            raise ConnectionError("bad CONNACK %s" % got.hex())
    except BaseException:
        sock.close()
        raise
    return sock


def _sleep_until(t):
    while True:
        left = t - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def conn_worker(pipe, addr, prefix, start_at, duration, timeout, ws=False, tls=None):
    """Connect, CONNECT, wait for CONNACK, DISCONNECT, close; repeat until the end.

    ``ws``: the same over WebSocket (upgrade, then the packets in frames);
    ``tls``: every connection makes a full TLS handshake first (no resumption).
    """
    template = mqttwire.ConnectTemplate(prefix)
    ctx = None
    if tls is not None:
        from bench.tlsbench import client_context
        ctx = client_context(tls)
    latencies = array("d")
    errors = {}
    n = 0
    _sleep_until(start_at)
    cpu0, t0 = self_cpu_seconds(), time.perf_counter()
    end = t0 + duration
    while True:
        began = time.perf_counter()
        if began >= end:
            break
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(addr)
            if ctx is not None:
                sock = ctx.wrap_socket(sock, server_hostname=tls[1])
            if ws:
                sock = wswire.WsSocket(sock).handshake(*addr)
            sock.sendall(template.build(n))
            if recv_exact(sock, 4) == mqttwire.CONNACK_OK:
                latencies.append(time.perf_counter() - began)
            else:
                errors["bad_connack"] = errors.get("bad_connack", 0) + 1
            sock.sendall(mqttwire.DISCONNECT)
        except OSError as exc:
            name = _error_name(exc)
            errors[name] = errors.get(name, 0) + 1
        finally:
            sock.close()
        n += 1
    pipe.send({"ok": len(latencies), "latencies": latencies.tobytes(), "errors": errors,
               "cpu": self_cpu_seconds() - cpu0, "wall": time.perf_counter() - t0})


def idle_worker(pipe, addr, prefix, count, timeout, hold, batch=100, tls=None):
    """Open ``count`` MQTT sessions, report, hold them until told (or ``hold`` s), close.

    ``tls``: each session over TLS (full handshake), as ``mqtt_session``.
    """
    template = mqttwire.ConnectTemplate(prefix)
    open_socks, errors = [], {}
    cpu0 = self_cpu_seconds()

    def fail(sock, exc):
        name = _error_name(exc)
        errors[name] = errors.get(name, 0) + 1
        sock.close()

    for first in range(0, count, batch):
        sent = []
        for i in range(first, min(count, first + batch)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(addr)
                sock = _tls_wrap(sock, tls)
                sock.sendall(template.build(i))
                sent.append(sock)
            except OSError as exc:
                fail(sock, exc)
        for sock in sent:
            try:
                if recv_exact(sock, 4) != mqttwire.CONNACK_OK:
                    raise ConnectionError("bad CONNACK")
                open_socks.append(sock)
            except OSError as exc:
                fail(sock, exc)
    pipe.send({"ok": len(open_socks), "errors": errors, "cpu": self_cpu_seconds() - cpu0})
    pipe.poll(hold)  # the harness measures, then says "close"
    for sock in open_socks:
        try:
            sock.sendall(mqttwire.DISCONNECT)
        except OSError:
            pass
        sock.close()
    pipe.send("closed")


def subscriber(pipe, addr, client_id, topic, received, start_at, duration, timeout, ws=False,
               tls=None, recv_size=1 << 20):
    """Subscribe, then count every byte the broker sends in [start_at, start_at+duration].

    Only QoS 0 PUBLISH frames arrive after the SUBACK (keep-alive 0: no
    PINGRESP), so the raw stream length is the delivered frame bytes (over
    WebSocket: the MQTT bytes inside the frames).  ``received`` (shared) lets
    the publisher bound what is in flight.
    """
    sock = mqtt_session(addr, client_id, timeout, ws, tls)
    sock.sendall(mqttwire.subscribe(topic))
    if recv_exact(sock, 5) != mqttwire.suback():
        raise ConnectionError("bad SUBACK")
    pipe.send("subscribed")
    buf = bytearray(recv_size)
    sock.settimeout(0.2)
    total = 0
    first = last = None
    cpu0 = self_cpu_seconds()
    end = start_at + duration
    while True:
        try:
            n = sock.recv_into(buf)
        except socket.timeout:
            n = -1
        now = time.time()
        if n == 0:
            break
        if n > 0:
            total += n
            received.value = total
        if first is None and now >= start_at:
            first = (now, total)
        if now >= end:
            last = (now, total)
            break
    cpu = self_cpu_seconds() - cpu0
    sock.close()
    if first is None or last is None or last[0] <= first[0]:
        pipe.send({"bytes": 0, "seconds": 0.0, "cpu": cpu, "error": "no data in window"})
    else:
        pipe.send({"bytes": last[1] - first[1], "seconds": last[0] - first[0], "cpu": cpu})


def publisher(pipe, addr, client_id, topic, payload_size, received, go_at, end_at,
              window, timeout, batch_bytes=256 * 1024, ws=False, tls=None):
    """Pipeline QoS 0 PUBLISH frames in ``sendall`` batches until ``end_at``.

    At most ``window`` bytes may be ahead of what the subscriber has read, so
    the broker never queues (or drops) without bound and the rate measured is
    what the whole chain sustains; ``window`` None: no bound (the chain backs
    up to the publisher, as an independent harness did).  A batch of less
    than one frame sends one frame a call (an unbatched publisher).
    """
    frame = mqttwire.publish(topic, b"x" * payload_size)
    batch = frame * max(1, batch_bytes // len(frame))
    sock = mqtt_session(addr, client_id, timeout, ws, tls)
    out = sock
    if ws:  # one frame per batch, built once (see wswire: the zero mask)
        batch, out = wswire.frame(batch), sock.sock
    _sleep_until(go_at)
    cpu0 = self_cpu_seconds()
    sent = waits = 0
    while time.time() < end_at:
        if window is not None and sent - received.value > window:
            waits += 1
            time.sleep(0.0002)
            continue
        out.sendall(batch)
        sent += len(batch)
    try:
        sock.sendall(mqttwire.DISCONNECT)
    except OSError:
        pass
    sock.close()
    pipe.send({"sent": sent, "waits": waits, "cpu": self_cpu_seconds() - cpu0})


def paced_publisher(pipe, addr, client_id, topic, rate, payload_size, timeout):
    """Publish QoS 0 at ``rate`` msgs/s on a fixed schedule until the harness says stop.

    Messages that fell behind the schedule (a late wake-up) are sent at once,
    so the average rate holds.
    """
    frame = mqttwire.publish(topic, b"x" * payload_size)
    sock = mqtt_session(addr, client_id, timeout)
    pipe.send("ready")
    interval, sent = 1.0 / rate, 0
    cpu0, t0 = self_cpu_seconds(), time.monotonic()
    while True:
        due = int((time.monotonic() - t0) / interval) + 1 - sent
        if due > 0:
            sock.sendall(frame * due)
            sent += due
        if pipe.poll(max(0.0, t0 + sent * interval - time.monotonic())):
            break  # "stop"
    seconds = time.monotonic() - t0
    pipe.recv()
    try:
        sock.sendall(mqttwire.DISCONNECT)
    except OSError:
        pass
    sock.close()
    pipe.send({"sent": sent, "seconds": seconds, "cpu": self_cpu_seconds() - cpu0})


def counting_subscriber(pipe, addr, client_id, topic, timeout):
    """Subscribe, then count the bytes delivered until the harness says stop."""
    sock = mqtt_session(addr, client_id, timeout)
    sock.sendall(mqttwire.subscribe(topic))
    if recv_exact(sock, 5) != mqttwire.suback():
        raise ConnectionError("bad SUBACK")
    pipe.send("subscribed")
    buf = bytearray(1 << 16)
    total, t0 = 0, time.monotonic()
    while True:
        ready, _, _ = select.select([sock, pipe], [], [], timeout)
        if pipe in ready or not ready:
            break
        n = sock.recv_into(buf)
        if not n:
            break
        total += n
    seconds = time.monotonic() - t0
    if pipe.poll():
        pipe.recv()
    sock.close()
    pipe.send({"bytes": total, "seconds": seconds})
