"""The relay: pump bytes both ways between two connected endpoints until both end.

Once a session is connected, its greenlet hands both endpoints to a ``Relay``
and returns: from then on the bytes are moved by hub I/O watcher callbacks,
so an idle session costs two sockets, two watchers and one small object, not
greenlet stacks.

Each direction reads into one shared buffer and writes straight to the other
side; what the other side does not take at once is kept as that direction's
backlog, and reading stops until it drains (back-pressure, as nginx does).
End of stream on one side is passed on as a half-close and the other
direction keeps flowing until it ends too (inetaf/tcpproxy's model).  An
error on either side aborts both.  Byte counts go onto the session record.

Three things make this more than a byte pump:

* **Event order.**  libev runs the callbacks of one loop iteration last-in
  first-out, the reverse of the order epoll reported the sockets ready, so
  bytes two clients sent 50 µs apart could reach the broker swapped.  Watcher
  callbacks therefore only record themselves; ``EventQueue`` replays them,
  after every I/O callback of the iteration, in the kernel's order, at most
  ``events.BATCH`` an iteration (a burst runs in slices; ``park``/``unpark``).
* **MQTT packet boundaries.**  On MQTT routes each direction follows where
  packets begin and end (``protocols.mqttstream``, headers only), so
  ``Relay.end_at_boundary`` can stop each direction exactly between two
  packets and append a DISCONNECT: the broker sees a clean disconnection and
  publishes no Will, an MQTT 5 client learns why.
* **splice(2).**  Bulk bytes move through a pipe without entering Python,
  MQTT packet boundaries still known (splicing.py says how).

An endpoint is a non-blocking C-level socket, or any object with
``recv_into``, ``send``, ``fileno``, ``shutdown`` and ``close`` that raises
``BlockingIOError`` for "not now" (a TLS endpoint also has ``pending()``).
Callbacks never block and never raise into the hub.
"""

import logging
import socket
import time

from gproxy.proxy.relay.direction import COPY, WALK, WRITE, Direction, reason_of, shutdown
from gproxy.proxy.relay.moving import Moving
from gproxy.proxy.relay.splicing import _RETRY, SPLICE_BODY, WALK_PACKET, Splicing

log = logging.getLogger("gproxy.relay")

class Relay(Splicing, Moving):
    """Bytes between ``client`` and ``upstream`` endpoints (the splice(2) paths:
    ``Splicing``, splicing.py; moving to another process: ``Moving``, moving.py)."""

    __slots__ = ("hub", "info", "on_done", "last", "idle", "reason", "up", "down", "deadline",
                 "slot", "slot_prev", "slot_next")

    def __init__(self, hub, client, upstream, info, on_done, idle, mqtt=False, replayed=b""):
        self.hub = hub
        self.idle = idle
        self.info = info
        self.on_done = on_done
        self.last = time.monotonic()
        self.reason = None
        self.deadline = None  # when a clean end gives up and aborts
        self.slot = None  # the sweeper's slot it waits in while live (hub.RelayHub)
        self.slot_prev = self.slot_next = None  # its neighbours there
        self.up = Direction(self, hub.loop, client, upstream, mqtt)  # counts info.bytes_in
        self.down = Direction(self, hub.loop, upstream, client, mqtt)  # info.bytes_out
        if mqtt and replayed:  # the replay may end inside a second packet
            self.up.track.feed(replayed)

    @property
    def client(self):
        return self.up.src

    @property
    def upstream(self):
        return self.down.src

    def start(self):
        self.hub.enter(self)
        for d in (self.up, self.down):
            if d.backlog is not None:  # resumed or restarted (moving.py): bytes owed first
                self._hold(d, d.backlog)
            elif not d.done:
                self._resume(d)
                if d.pending is not None and d.pending():
                    self._readable(d)  # bytes (or an end) in hand already: no watcher would fire

    def _resume(self, d):
        d.reader.start(d)  # d records itself in the event queue (events.EventQueue)

    # -- moving bytes ------------------------------------------------------
    def _readable(self, d):
        if self.reason is not None or d.done or d.backlog is not None:
            return  # (or a record from before the reader stopped, run in a later slice)
        if d.splicing:
            return self._spliced(d)
        try:
            n = d.src.recv_into(self.hub.buffer)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in _RETRY:
                self.abort(reason_of(exc))
            return
        if not n:
            return self._eof(d)
        view = memoryview(self.hub.buffer)[:n]
        track = d.track
        packets = 0  # headers seen in this read (a tracked direction)
        if track is not None:
            if d.ending:
                cut = track.next_boundary(view, 0, n)
                if cut is not None:  # forward up to the boundary, then say goodbye
                    self._moved(d, cut)
                    return self._send_last(d, view[:cut])
            else:
                packets = track.packets
                track.feed(view, 0, n)
                packets = track.packets - packets
        self.last = time.monotonic()  # (_moved, inline: this runs for every read)
        if d is self.up:
            self.info.bytes_in += n
        else:
            self.info.bytes_out += n
        self._send(d, view)
        if (d.backlog is None and not d.ending
                and (n >= WALK_PACKET or track is not None and track.left >= SPLICE_BODY)
                and d.splice_ok()):
            self._choose_splicing(d, n, track, packets)
        if d.pending is not None and d.backlog is None and d.pending():
            self.hub.queue.append(d)  # decrypted bytes wait in TLS

    def _moved(self, d, n):
        """``n`` bytes came from d.src: the session's byte count, the idle clock."""
        self.last = time.monotonic()
        if d is self.up:
            self.info.bytes_in += n
        else:
            self.info.bytes_out += n

    def _send(self, d, view):
        try:
            sent = d.dst.send(view)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            if exc.errno not in _RETRY:
                self.abort(reason_of(exc))
                return
            sent = 0
        if sent < len(view):  # the other side is full: hold the rest, stop reading
            self._hold(d, bytes(view[sent:]))

    def _hold(self, d, backlog):
        d.backlog = backlog
        d.reader.stop()
        if d.writer is None:
            d.writer = self.hub.loop.io(d.dst.fileno(), WRITE)
        d.writer.start(d)

    def _writable(self, d):
        if self.reason is not None or d.backlog is None:
            return
        if isinstance(d.backlog, int):
            left = self._drain_pipe(d, d.backlog)
        else:
            try:
                sent = d.dst.send(d.backlog)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in _RETRY:
                    self.abort(reason_of(exc))
                return
            left = d.backlog[sent:] if sent < len(d.backlog) else None
        if self.reason is not None:
            return
        self.last = time.monotonic()
        d.backlog = left or None
        if d.backlog is not None:
            return
        d.writer.stop()
        if d.done:  # the goodbye (or the last bytes before EOF) went out
            return self._closed_out(d)
        if d.ending and (d.track is None or d.track.at_boundary):
            return self._say_bye(d)
        self._resume(d)
        if d.pending is not None and d.pending():
            self.hub.queue.append(d)  # no watcher fires for those bytes

    def _eof(self, d):
        d.reader.stop()
        d.done = True
        if d.backlog is None:
            self._closed_out(d)

    def _closed_out(self, d):
        """Nothing more will go to d.dst: pass the half-close on, or finish."""
        other = self.down if d is self.up else self.up
        if other.done and other.backlog is None:
            self.finish()  # both ways ended: close() sends the FIN
        else:
            shutdown(d.dst, socket.SHUT_WR)

    # -- ending cleanly ----------------------------------------------------
    def end_at_boundary(self, broker_bye, client_bye, grace):
        """Stop each direction at its next packet boundary and say goodbye.

        ``broker_bye`` goes to the broker after the client's last whole
        packet; ``client_bye`` (None: nothing) to the client after the
        broker's.  Returns False, having aborted, when the boundaries are not
        known (not an MQTT route, or a stream that stopped parsing).
        """
        if self.reason is not None:
            return True
        if self.up.track is None or self.up.track.lost or self.down.track.lost:
            self.abort("shutdown")
            return False
        self.deadline = time.monotonic() + grace
        self.hub.schedule(self, self.due())  # sooner, if the grace ends before the idle time
        for d, bye in ((self.up, broker_bye), (self.down, client_bye)):
            if d.done or d.ending:
                continue
            d.ending, d.bye = True, bye
            if d.splicing == WALK:
                d.splicing = COPY  # the last packets are copied: they end at a boundary
            if d.backlog is None and not d.splicing and d.track.at_boundary:
                self._say_bye(d)
        return True

    def _send_last(self, d, view):
        """Forward the rest of the last whole packet, then the goodbye."""
        if len(view):
            self._send(d, view)
        if d.backlog is None:
            self._say_bye(d)
        else:
            d.backlog = bytes(d.backlog) + (d.bye or b"")
            d.bye = None
            d.reader.stop()
            d.done = True

    def _say_bye(self, d):
        d.reader.stop()
        d.done = True
        bye, d.bye = d.bye, None
        if bye:
            self._send(d, memoryview(bye))
            if self.reason is not None:
                return
        if d.backlog is None:
            self._closed_out(d)

    def due(self):
        """When this relay is next to be ended unless bytes move: idle, or end grace out."""
        idle_out = self.last + self.idle
        return idle_out if self.deadline is None else min(idle_out, self.deadline)

    def abort(self, reason):
        """End both directions now (error, idle, or an operator's disconnect)."""
        if self.reason is None:
            self.reason = reason
        self.finish()

    def finish(self):
        if self.slot is None:
            return  # not started, or finished already
        self.hub.leave(self)
        if self.reason is None:
            self.reason = "eof"  # queued callbacks of this relay now do nothing
        for d in (self.up, self.down):
            d.close()  # (the watchers held this relay through their callbacks: a cycle)
        for sock in (self.client, self.upstream):
            sock.close()
        on_done, self.on_done = self.on_done, None  # (the session holds this relay: a cycle)
        try:
            on_done(self)
        except Exception:  # never raise into the hub
            log.exception("relay: completion callback failed")
