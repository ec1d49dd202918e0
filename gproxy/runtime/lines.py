"""Newline-framed messages read from a socket, kept across interruptions.

Shared by the control channels that speak JSON lines: the parent and its
``--workers`` (``channel``), and an embedding host and its gproxy process
(``embed``).  Works on any object with ``recv`` (a gevent socket or a plain
one); imports no gevent, so a host that embeds gproxy can use it.  Each byte
is looked at once while a long line arrives (a rescan of the whole buffer per
chunk made a table of many thousands of routes cost its square).
"""

import logging

log = logging.getLogger("gproxy.workers")

MAX_LINE = 64 * 1024 * 1024  # a route table of many thousands of routes still fits


class LineReader:
    """Newline-framed messages from a socket; lines are split from our own buffer,
    so an interrupted read (a timeout) never loses bytes."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.scanned = 0  # bytes of buf known to hold no newline

    def readline(self):
        """The next non-empty line without its newline; ``b""`` at EOF."""
        while True:
            end = self.buf.find(b"\n", self.scanned)
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 1]
                self.scanned = 0
                if line.strip():
                    return line
                continue
            self.scanned = len(self.buf)
            if len(self.buf) > MAX_LINE:
                log.error("control channel: dropped a line longer than %d bytes", MAX_LINE)
                self.buf.clear()
                self.scanned = 0
            if not self.fill():
                return b""

    def read_exactly(self, size):
        """The next ``size`` bytes (a raw body after a line); EOFError if they never come."""
        while len(self.buf) < size:
            if not self.fill():
                raise EOFError("channel closed within a %d-byte body" % size)
        data = bytes(self.buf[:size])
        del self.buf[:size]
        self.scanned = max(0, self.scanned - size)
        return data

    def fill(self):
        """One ``recv`` into the buffer; False at EOF."""
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)
