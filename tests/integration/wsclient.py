"""Test-side WebSocket pieces: a raw client and a WebSocket-to-TCP bridge broker.

Both use tests/wsframes.py (the independent builder), never gproxy's code.
``WsClient`` speaks frames by hand so a test can fragment, ping, misbehave
and read close codes.  ``WsBridge`` plays a broker's WebSocket listener for
gproxy's passthrough mode: it answers the upgrade itself, records the request
and the raw frames it got, and carries MQTT to a real mosquitto over TCP.
"""

import socket
import threading

from tests import wsframes as W
from tests.integration.helpers import HOST, WAIT, dial


class WsClient:
    """One raw WebSocket client connection through gproxy."""

    def __init__(self, port, path="/mqtt", source=None, request=None, **kw):
        self.sock = dial(port, source)
        self.local_port = self.sock.getsockname()[1]
        self.key = W.new_key()
        self.sock.sendall(request if request is not None else
                          W.upgrade_request(path=path, key=self.key, **kw))
        self.buf = b""
        self.status = self.headers = None

    def handshake(self):
        """Read the HTTP answer: ``(status, headers)``; frames after it stay buffered."""
        while W.response_head(self.buf) is None:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("closed before an HTTP answer; got %r" % self.buf)
            self.buf += chunk
        self.status, self.headers, self.buf = W.response_head(self.buf)
        return self.status, self.headers

    def open(self):
        status, headers = self.handshake()
        assert status == 101, (status, headers)
        assert headers["sec-websocket-accept"] == W.accept_for(self.key)
        return self

    def send(self, data):
        self.sock.sendall(data)

    def send_mqtt(self, data, sizes=None):
        self.sock.sendall(W.fragments(data, sizes or []))

    def frame(self):
        """The next frame: ``(fin, opcode, payload)``."""
        while True:
            parsed = W.read_frame(self.buf)
            if parsed is not None:
                fin, opcode, payload, self.buf = parsed
                return fin, opcode, payload
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise AssertionError("closed mid-frame; have %r" % self.buf[:64])
            self.buf += chunk

    def mqtt(self, n):
        """``n`` MQTT bytes from binary frames; returns (bytes, frames used)."""
        got, frames = b"", 0
        while len(got) < n:
            fin, opcode, payload = self.frame()
            assert opcode in (W.BINARY, W.CONT), "opcode %d: %r" % (opcode, payload[:60])
            got += payload
            frames += 1
        assert len(got) == n, "more MQTT bytes than expected: %r" % got[n:n + 40]
        return got, frames

    def expect_close(self, code):
        fin, opcode, payload = self.frame()
        assert (opcode, W.close_code(payload)) == (W.CLOSE, code), (opcode, payload)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class WsBridge:
    """A broker's WebSocket listener: upgrades, then carries MQTT to ``target`` over TCP."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(16)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.requests = []      # each upgrade request head, as received
        self.client_bytes = []  # raw bytes after the head, per connection
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(WAIT)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn):
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            head, rest = head.split(b"\r\n\r\n", 1)
            self.requests.append(head + b"\r\n\r\n")
            raw = bytearray(rest)
            self.client_bytes.append(raw)
            key = [ln.split(b":", 1)[1].strip().decode() for ln in head.split(b"\r\n")
                   if ln.lower().startswith(b"sec-websocket-key:")][0]
            conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n"
                          "Sec-WebSocket-Protocol: mqtt\r\n\r\n" % W.accept_for(key)).encode())
            broker = socket.create_connection((HOST, self.target_port), timeout=WAIT)
            conn.settimeout(None)
            broker.settimeout(None)
            threading.Thread(target=self._down, args=(broker, conn), daemon=True).start()
            self._up(conn, broker, raw, bytes(rest))
        except OSError:
            pass
        finally:
            conn.close()

    def _up(self, conn, broker, raw, pending):
        buf = pending
        while True:
            parsed = W.read_frame(buf, masked=True)
            if parsed is None:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                raw += chunk
                buf += chunk
                continue
            fin, opcode, payload, buf = parsed
            if opcode in (W.BINARY, W.CONT):
                broker.sendall(payload)
            elif opcode == W.PING:
                conn.sendall(W.frame(W.PONG, payload, mask=None))
            elif opcode == W.CLOSE:
                conn.sendall(W.frame(W.CLOSE, payload[:2], mask=None))
                break
        broker.close()

    def _down(self, broker, conn):
        try:
            while True:
                chunk = broker.recv(65536)
                if not chunk:
                    break
                conn.sendall(W.binary(chunk, mask=None))
            conn.sendall(W.close(1000, mask=None))
        except OSError:
            pass

    def close(self):
        self._stop.set()
        self.listener.close()
