"""The connections of one HTTP listener: the cap, the deadlines, who gives way.

An HTTP listener (Admin API, control API, metrics) keeps at most ``limit``
connections open, so it never takes the file descriptors sessions need.  A
connection is in one of four states:

``waiting``  accepted, or kept alive after a response, and no byte of a
             request yet: closed after ``idle`` seconds (keep-alive timeout);
``reading``  a request has begun and is not yet whole (request line, headers,
             body; for HTTPS the handshake too): closed ``request`` seconds
             after its first byte, however slowly it trickles (HAProxy's
             ``timeout http-request``, what slowloris defeats per-read
             timeouts with);
``busy``     the application runs: no deadline, never reclaimed;
``writing``  the response goes out: closed if not taken within ``request``
             seconds (nginx's ``send_timeout``, against slow readers).

At the cap a new connection is not left in the kernel's backlog behind idle
ones (which is how 64 idle clients used to deny the Admin API for 30 s): it
takes the place of one that is not busy, as nginx reclaims its "reusable"
connections.  The one that gives way belongs to the client address holding
the most connections (so a flood from one address only ever displaces its
own), and is that client's longest-waiting one, else its oldest slow reader
or writer; a request whose bytes are already there when it is accepted
starts in ``reading``, behind every idle connection.  Only when every
connection is busy does the listener stop accepting until one is done.

Closing means ``shutdown(2)`` of the descriptor, at once: the connection's
greenlet wakes to end-of-file, sees ``dropped`` and ends without acting on
what it had read (no exception is thrown into it, so a half-read request can
never reach the application).  A connection no greenlet serves yet (the
listener waits for its first byte with a bare watcher) is closed by the
listener there and then (``on_drop``).  This module knows no HTTP and writes no log
line; the listener reports ``Conn.reason`` once the connection is gone.
"""

import socket

import _socket

WAITING, READING, BUSY, WRITING = "waiting", "reading", "busy", "writing"
#: why a connection is closed when its state's deadline passes
_EXPIRY = {WAITING: "idle", READING: "request_timeout", WRITING: "send_timeout"}


def _on_fd(fd, call):
    """``call(s)`` with ``s`` a plain socket object on descriptor ``fd`` (whatever
    object wraps it now: TLS detaches the accepted one); the descriptor stays
    open.  The C module's socket, which no monkey-patching replaces: it never
    waits on the hub."""
    raw = _socket.socket(fileno=fd)
    try:
        return call(raw)
    finally:
        raw.detach()


def shutdown(fd):
    """``shutdown(SHUT_RDWR)`` of descriptor ``fd``: its reader wakes to end-of-file."""
    try:
        _on_fd(fd, lambda s: s.shutdown(socket.SHUT_RDWR))
    except OSError:
        pass  # the peer is gone already


def readable(fd):
    """True if bytes (a request, a ClientHello) are already waiting on ``fd``."""
    try:
        return bool(_on_fd(fd, lambda s: s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)))
    except OSError:
        return False


class Conn:
    """One accepted connection: its socket, client address and state."""

    __slots__ = ("sock", "fd", "address", "client", "state", "reason", "dropped", "timer",
                 "table", "watcher")

    def __init__(self, table, sock, address):
        self.table = table
        self.sock = sock
        self.fd = sock.fileno()  # open until the listener closes it, after ``release``
        self.address = address
        self.client = address[0] if isinstance(address, tuple) else ""
        self.state = None
        self.reason = None  # why gproxy closed it: idle, request_timeout, reclaimed, ...
        self.dropped = False  # shut by the table: its greenlet must act on nothing more
        self.timer = None
        self.watcher = None  # the listener's, while no greenlet serves it yet

    def enter(self, state):
        """Move to ``state`` (re-arming its deadline); no-op once dropped."""
        if not self.dropped:
            self.table.move(self, state)

    def drop(self, reason):
        self.table.drop(self, reason)


class _Client:
    """The connections one client address holds, in the order to reclaim them."""

    __slots__ = ("total", "idle", "slow")

    def __init__(self):
        self.total = 0
        self.idle = {}  # waiting connections, oldest first (dicts keep insertion order)
        self.slow = {}  # reading or writing, oldest first

    def victim(self):
        for group in (self.idle, self.slow):
            for conn in group:
                return conn
        return None


class Conns:
    """The table of one listener's open connections (see the module docstring).

    ``loop`` is the hub's loop (for deadlines); ``on_room`` is called when a
    listener that stopped accepting (every connection busy) may accept again.
    ``on_drop(conn)`` may close a dropped connection itself (one no greenlet
    serves yet) and say so; otherwise its descriptor is shut down for the
    greenlet to see.  ``readable`` and ``shutdown`` act on a descriptor
    (tests pass fakes).
    """

    def __init__(self, loop, limit, idle, request, on_room=lambda: None,
                 on_drop=lambda conn: False, readable=readable, shutdown=shutdown):
        self.loop = loop
        self.on_room, self.on_drop = on_room, on_drop
        self.readable, self.shutdown = readable, shutdown
        self.limit, self.idle, self.request = limit, idle, request
        self.clients = {}
        self.count = 0
        self.busy = 0

    def configure(self, limit, idle, request):
        """New cap and timeouts (SIGHUP); open connections get them at their next state."""
        self.limit, self.idle, self.request = limit, idle, request
        if not self.full():
            self.on_room()

    def full(self):
        """True when at the cap and no connection may give way: stop accepting."""
        return self.count >= self.limit and self.busy >= self.count

    def admit(self, sock, address):
        """Register a new connection, displacing one at the cap."""
        while self.count >= self.limit:
            victim = self._victim()
            if victim is None:
                break
            self.drop(victim, "reclaimed")
        conn = Conn(self, sock, address)
        self.count += 1
        client = self.clients.get(conn.client)
        if client is None:
            client = self.clients[conn.client] = _Client()
        client.total += 1
        # a request whose bytes are already there starts behind every idle connection
        self.move(conn, READING if self.readable(conn.fd) else WAITING)
        return conn

    def _victim(self):
        """The busiest client's longest-waiting (else oldest slow) connection."""
        best = None
        for client in self.clients.values():
            if (client.idle or client.slow) and (best is None or client.total > best.total):
                best = client
        return best.victim() if best is not None else None

    def move(self, conn, state):
        was_full = self.full()
        client = self.clients[conn.client]
        self._leave_state(conn, client)
        conn.state = state
        if state == BUSY:
            self.busy += 1
        else:
            (client.idle if state == WAITING else client.slow)[conn] = None
            conn.timer = self.loop.timer(self.idle if state == WAITING else self.request)
            conn.timer.start(self.drop, conn, _EXPIRY[state])
        if was_full and not self.full():
            self.on_room()

    def _leave_state(self, conn, client):
        if conn.timer is not None:
            conn.timer.stop()  # (not close(): this may run inside the timer's own callback)
            conn.timer = None
        if conn.state == BUSY:
            self.busy -= 1
        else:
            client.idle.pop(conn, None)
            client.slow.pop(conn, None)

    def drop(self, conn, reason):
        """Close ``conn`` now for ``reason`` (a deadline, or room for another)."""
        if conn.dropped:
            return
        conn.dropped, conn.reason = True, reason
        self.release(conn)
        if not self.on_drop(conn):
            self.shutdown(conn.fd)

    def release(self, conn):
        """Forget ``conn`` (its greenlet has ended, or it was dropped); idempotent."""
        client = self.clients.get(conn.client)
        if conn.state is None or client is None:
            return
        was_full = self.full()
        self._leave_state(conn, client)
        conn.state = None
        self.count -= 1
        client.total -= 1
        if not client.total:
            del self.clients[conn.client]
        if was_full and not self.full():
            self.on_room()

    def drop_all(self, reason=None):
        """Shut every connection that is not busy (the listener is stopping)."""
        for client in list(self.clients.values()):
            for conn in list(client.idle) + list(client.slow):
                self.drop(conn, reason or "stopping")

    def snapshot(self):
        """``{state: count}`` and the number of client addresses (for stats)."""
        counts = {WAITING: 0, READING: 0, BUSY: self.busy, WRITING: 0}
        for client in self.clients.values():
            for conn in list(client.idle) + list(client.slow):
                counts[conn.state] += 1
        return counts, len(self.clients)
