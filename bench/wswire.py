"""MQTT over WebSocket for the load generator: the upgrade and frames, stdlib only.

Independent of gproxy (like mqttwire.py).  Client frames carry the all-zero
masking key: RFC 6455 §5.3 wants browsers to pick unpredictable keys, but a
server cannot tell and must unmask every byte anyway, so the proxy does the
same work while the load generator spends no CPU masking.  Server frames are
unmasked (§5.1); ``Unframer`` strips their headers from a byte stream.
"""

import base64
import struct

KEY = base64.b64encode(b"gproxy-benchmark").decode()  # 16 bytes, as §4.1 asks
ZERO_MASK = b"\0\0\0\0"
BINARY, CLOSE = 0x2, 0x8


def upgrade(host, port, path="/mqtt"):
    """The client's opening handshake (§4.1) offering the ``mqtt`` subprotocol."""
    return ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: mqtt\r\n\r\n" % (path, host, port, KEY)).encode()


def frame(payload, opcode=BINARY):
    """One masked client frame (FIN set) around ``payload``."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + ZERO_MASK + payload  # XOR with zeros leaves the payload as is


class Unframer:
    """Payload bytes of unmasked server frames, from a stream cut anywhere."""

    def __init__(self):
        self.left = 0        # payload bytes of the current frame still to come
        self.head = b""      # a header split across reads
        self.opcode = BINARY

    def feed(self, data):
        """``(payload pieces, close seen)`` for ``data`` (a bytes-like object)."""
        pieces, pos, end = [], 0, len(data)
        while pos < end:
            if self.left:
                take = min(self.left, end - pos)
                if self.opcode != CLOSE:
                    pieces.append(data[pos:pos + take])
                self.left -= take
                pos += take
                continue
            head = self.head + bytes(data[pos:pos + 10 - len(self.head)])
            need = 2 if len(head) < 2 else 2 + {126: 2, 127: 8}.get(head[1] & 0x7F, 0)
            if len(head) < need or len(head) < 2:
                self.head = head
                return pieces, False
            used = need - len(self.head)
            self.head = b""
            n = head[1] & 0x7F
            n = struct.unpack("!H", head[2:4])[0] if n == 126 else \
                struct.unpack("!Q", head[2:10])[0] if n == 127 else n
            self.opcode = head[0] & 0x0F
            if self.opcode == CLOSE:
                return pieces, True
            self.left = n
            pos += used
        return pieces, False


class WsSocket:
    """A connected socket speaking MQTT inside WebSocket frames (blocking, with timeouts)."""

    def __init__(self, sock):
        self.sock = sock
        self.unframer = Unframer()
        self.pending = b""
        self.raw = bytearray(1 << 20)

    def handshake(self, host, port):
        self.sock.sendall(upgrade(host, port))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the WebSocket handshake")
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError("upgrade refused: %r" % head.split(b"\r\n", 1)[0])
        self._take(rest)
        return self

    def _take(self, data):
        pieces, closed = self.unframer.feed(data)
        self.pending += b"".join(bytes(p) for p in pieces)
        return closed

    def sendall(self, data):
        self.sock.sendall(frame(data))

    def recv(self, n):
        while not self.pending:
            chunk = self.sock.recv(65536)
            if not chunk or self._take(chunk) and not self.pending:
                return b""
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def recv_into(self, buf):
        """MQTT bytes into ``buf``; 0 at the end (TCP close or Close frame)."""
        if self.pending:
            n = min(len(buf), len(self.pending))
            buf[:n] = self.pending[:n]
            self.pending = self.pending[n:]
            return n
        while True:
            got = self.sock.recv_into(self.raw, min(len(buf), len(self.raw)))
            if not got:
                return 0
            pieces, closed = self.unframer.feed(memoryview(self.raw)[:got])
            n = 0
            for piece in pieces:
                buf[n:n + len(piece)] = piece
                n += len(piece)
            if n or closed:
                return n

    def settimeout(self, t):
        self.sock.settimeout(t)

    def setsockopt(self, *args):
        self.sock.setsockopt(*args)

    def close(self):
        self.sock.close()
