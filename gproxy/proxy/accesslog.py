"""The stream access log: one line per session, written off the hub.

APISIX's ``nginx_config.stream.enable_access_log`` / ``access_log`` /
``access_log_format`` / ``access_log_format_escape`` (an nginx ``log_format``
of stream variables, plus APISIX's ``$mqtt_client_id`` and gproxy's
``$mqtt_username``, ``$route_id``...).  Every session gets its line when it
ends, refused ones included, as nginx logs every stream session; ``$status``
is nginx's stream status (``STATUS``).

The hub only formats the line (a few microseconds) and appends it to a
pending batch, handed to one thread of a gevent ``ThreadPool`` once it holds
``BUFFER`` bytes or ``FLUSH_EVERY`` seconds after its first line (APISIX's
nginx.conf: ``buffer=16384 flush=3``); the thread writes it whole (one
``write(2)``, the file opened ``O_APPEND``, so workers can share it), one
batch in flight at a time: what arrives meanwhile is the next batch.  The
pending batch is bounded (``MAX_PENDING`` bytes): when the disk cannot
keep up, new lines are dropped, counted (``dropped``) and reported in the
error log at most every ``WARN_EVERY`` seconds: the hub never waits for a
disk.  ``reopen()`` (SIGUSR1, for logrotate) makes the writer close and
reopen the path before its next write, as nginx does.
"""

import logging
import os
import socket
import time

import gevent
from gevent.threadpool import ThreadPool

from gproxy.model.logformat import PLAIN, compile_format

log = logging.getLogger("gproxy.accesslog")
MAX_PENDING = 4 * 1024 * 1024  # bytes waiting for the writer before lines are dropped
BUFFER = 16384     # bytes that make a batch worth writing at once
FLUSH_EVERY = 1.0  # seconds a line may wait for more (nginx's flush=, APISIX sets 3)
WARN_EVERY = 10.0  # seconds between two "dropped" warnings

#: ``$status`` of a refused session by refusal reason: the code the refusing APISIX
#: plugin returns (limit-conn 503, mqtt-proxy 503 as the preread sets it; ip-restriction
#: carries its own), else nginx's own for the cause (400 a PROXY header it cannot
#: parse, 500 a failed TLS handshake, 502 no node selected or reached, 200 a client
#: that left or timed out before a PROXY header). Anything else: 500.
STATUS = {"proxy_protocol": 400, "closed": 200, "timeout": 200,
          "limit_conn": 503, "limit_rate": 503, "limit": 503,
          "no_route": 502, "no_upstream": 502, "upstream_unavailable": 502,
          "replay_failed": 502, "ws_upstream": 502, "fd_limit": 502}
_HOSTNAME = socket.gethostname()


def status(s):
    """nginx's ``$status`` for a session that ended (``s.refusal``: its Reject or None)."""
    refusal = s.refusal
    if refusal is None:
        return 200
    if isinstance(refusal, OSError):
        return 500
    if refusal.status is not None:
        return refusal.status
    if refusal.reason.startswith("tls_"):
        return 500
    return STATUS.get(refusal.reason, 500)


def _bytes_received(s):
    info = s.info
    return info.bytes_in if info.bytes_in else len(s.replay)  # read, never forwarded


_clock = [None, None]  # the second last formatted, and its $time_local (nginx caches it too)


def _time_local(now):
    second = int(now)
    if _clock[0] != second:
        _clock[1] = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(second))
        _clock[0] = second
    return _clock[1]


def _time_iso8601(now):
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))
    return stamp[:-2] + ":" + stamp[-2:]


#: nginx stream variables (and APISIX's/gproxy's) from an ended session ``s`` at ``now``:
#: the names of ``logformat.STREAM_VARIABLES``, which the config checks formats against.
VARIABLES = {
    "remote_addr": lambda s, now: s.info.client_addr,
    "remote_port": lambda s, now: str(s.info.client_port),
    "server_addr": lambda s, now: s.info.server_addr,
    "server_port": lambda s, now: str(s.info.server_port),
    "protocol": lambda s, now: "TCP",
    "status": lambda s, now: "%03d" % status(s),
    "bytes_sent": lambda s, now: str(s.info.bytes_out),
    "bytes_received": lambda s, now: str(_bytes_received(s)),
    "session_time": lambda s, now: "%.3f" % max(now - s.info.connected_at, 0.0),
    "time_local": lambda s, now: _time_local(now),
    "time_iso8601": lambda s, now: _time_iso8601(now),
    "msec": lambda s, now: "%.3f" % now,
    "connection": lambda s, now: s.info.seq,
    "pid": lambda s, now: str(os.getpid()),
    "hostname": lambda s, now: _HOSTNAME,
    "upstream_addr": lambda s, now: ", ".join(s.tried) or None,
    "upstream_bytes_sent": lambda s, now: str(s.info.bytes_in) if s.info.node else None,
    "upstream_bytes_received": lambda s, now: str(s.info.bytes_out) if s.info.node else None,
    "ssl_server_name": lambda s, now: s.sni,
    "route_id": lambda s, now: s.info.route_id,
    "mqtt_client_id": lambda s, now: s.info.client_id or None,
    "mqtt_username": lambda s, now: s.info.username,
    "mqtt_protocol_level": lambda s, now: (None if s.info.protocol_level is None
                                           else str(s.info.protocol_level)),
    "tls_client_cn": lambda s, now: s.info.tls_client_cn,
    "session_id": lambda s, now: s.info.id,
}
DEFAULT_FORMAT = ("$remote_addr [$time_local] $protocol $status $bytes_sent "
                  "$bytes_received $session_time")  # APISIX's cli/config.lua


class AccessLog:
    """The stream access log of one process (each ``--workers`` worker has its own)."""

    def __init__(self, path, fmt=DEFAULT_FORMAT, escape="default", max_pending=MAX_PENDING):
        self.path = path
        self.format = compile_format(fmt, VARIABLES, escape, PLAIN)  # ValueError: unknown name
        self._line = self.format.bind(VARIABLES)  # line(session, now)
        self.max_pending = max_pending
        self.dropped = 0
        self._pending, self._pending_bytes = [], 0
        self._writing = False
        self._reopen = False
        self._file = None
        self._pool = None  # made on first use, in the process (and hub) that writes
        self._timer = None
        self._warned_at, self._dropped_since_warning = 0.0, 0

    def check(self):
        """Open the file once now (start-up), so a bad path is an error there."""
        self._open().close()

    def session(self, s):
        """Queue ``s``'s line (called once when the session ends)."""
        now = time.time()
        line = self._line(s, now) + b"\n"
        if self._pending_bytes + len(line) > self.max_pending:
            self._drop(now)
            return
        self._pending.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes >= BUFFER:
            self._kick()
        else:
            self._later()

    def reopen(self):
        """Close and reopen the path before the next write (logrotate's SIGUSR1)."""
        self._reopen = True
        self._kick(force=True)

    def close(self, timeout=2.0):
        """Write what is pending (up to ``timeout`` seconds), then close the file."""
        deadline = time.monotonic() + timeout
        while (self._writing or self._pending) and time.monotonic() < deadline:
            self._kick()
            gevent.sleep(0.01)
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        if self._pool is not None:
            self._pool.kill()
            self._pool = None
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- the hub side --------------------------------------------------------------
    def _later(self):
        """Kick in ``FLUSH_EVERY`` seconds, unless a kick is already due."""
        if self._timer is not None and self._timer.active:
            return
        if self._timer is not None:
            self._timer.close()  # a fired libev timer restarted would fire at once: a new one
        self._timer = gevent.get_hub().loop.timer(FLUSH_EVERY)
        self._timer.start(self._kick)

    def _kick(self, force=False):
        if self._writing or not (self._pending or force):
            return
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        self._writing = True
        if self._pool is None:
            self._pool = ThreadPool(1)
        self._pool.spawn(self._write, b"".join(batch)).rawlink(self._written)

    def _written(self, result):
        self._writing = False
        if not result.successful():
            log.error("access log: cannot write %s: %s", self.path, result.exception)
        if self._reopen or self._pending_bytes >= BUFFER:
            self._kick(force=self._reopen)
        elif self._pending:
            self._later()

    def _drop(self, now):
        self.dropped += 1
        self._dropped_since_warning += 1
        if now - self._warned_at >= WARN_EVERY:
            log.warning("access log: %d lines dropped: %s cannot keep up (%d bytes waiting)",
                        self._dropped_since_warning, self.path, self._pending_bytes)
            self._warned_at, self._dropped_since_warning = now, 0

    # -- the writer thread ---------------------------------------------------------
    def _open(self):
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        return open(self.path, "ab", buffering=0)

    def _write(self, data):
        if self._reopen or self._file is None:
            self._reopen = False
            if self._file is not None:
                self._file.close()
            self._file = self._open()
        view = memoryview(data)
        while view:
            view = view[self._file.write(view):]
