"""The control channel between the parent and one worker: JSON lines with ids.

Every request carries an ``id`` and its reply echoes it, so a reply that
arrives after its caller timed out is recognised and dropped instead of
answering the next request.  Every message starts with a newline: a message
cut short by a timeout then ends up on a line of its own, which the reader
logs and drops, and the next message starts clean.  Lines are split from our
own buffer, so an interrupted read never loses bytes, and each byte is
looked at once while a long line arrives (a rescan of the whole buffer per
chunk made a table of many thousands of routes cost its square).
"""

import itertools
import json
import logging

import gevent
from gevent.lock import Semaphore

from gproxy.model import jsontext
from gproxy.runtime.lines import MAX_LINE, LineReader  # noqa: F401 (the channel's framing)

log = logging.getLogger("gproxy.workers")

ACK_TIMEOUT = 5.0


def encode(message):
    return b"\n" + json.dumps(message, separators=(",", ":")).encode() + b"\n"


def encode_large(message, pause, every=128):
    """``encode`` for a reply with a long ``list`` (a deep page of sessions):
    the items are serialised ``every`` at a time with ``pause()`` in between,
    so a worker's hub is never held for the whole list."""
    text = jsontext.dumps_long(message, pause, every=every, separators=(",", ":"))
    return b"\n" + text.encode() + b"\n"


def decode(line):
    """A message dict, or None (logged) for a line that is not one."""
    try:
        message = json.loads(line)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        log.error("control channel: dropped a malformed message (%d bytes)", len(line))
        return None
    return message


class Channel:
    """The parent's end of one worker's control socket, one request at a time."""

    def __init__(self, pid, sock):
        self.pid = pid
        self.sock = sock
        self.reader = LineReader(sock)
        self.lock = Semaphore()
        self._ids = itertools.count(1)

    def call(self, message, timeout=ACK_TIMEOUT):
        """Send ``message`` and return the reply with the same id."""
        with self.lock:
            request_id = next(self._ids)
            with gevent.Timeout(timeout):
                self.sock.sendall(encode(dict(message, id=request_id)))
                while True:
                    line = self.reader.readline()
                    if not line:
                        raise OSError("worker %d closed its control channel" % self.pid)
                    reply = decode(line)
                    if reply is not None and reply.get("id") == request_id:
                        return reply
                    if reply is not None:
                        log.info("worker %d: dropped a late reply to request %s",
                                 self.pid, reply.get("id"))

    def hello(self, timeout):
        """The worker's first line (ready or error), or None if it does not come."""
        with gevent.Timeout(timeout, False):
            line = self.reader.readline()
            return decode(line) if line else {"error": "exited"}
        return None

    def close(self):
        self.sock.close()
